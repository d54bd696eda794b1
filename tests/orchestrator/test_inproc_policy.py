"""The train policy under in-process recovery: a node its peers report silent is
cancelled and replaced without waiting for Slurm, a rank its agent restarted is not, the
session number the nodes carry, and the leftovers of a finished run.

The real TrainPolicy, JobTracker and StateStore over test_train_policy's scripted
executor; the in-band reports are written as the trainers and agents write them
(events/inproc/<uid>.jsonl), with times on the case's clock."""

from __future__ import annotations

import json
from pathlib import Path

from fm9g.orchestrator.inproc_losses import GRACE_S
from fm9g.orchestrator.plan import TRAIN
from fm9g.orchestrator.state import JobState, StageStatus
from fm9g.rundir.atomic import write_json
from tests.orchestrator.test_store_job import WAIT, all_running
from tests.orchestrator.test_train_policy import Case, last, make_case


def report(case: Case, uid: str, event: str, at: float, **fields: object) -> None:
    """One line of `uid`'s events file, as EventWriter appends it, stamped `at`."""
    folder = case.run.inproc_events
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{uid}.jsonl").open("a") as handle:
        handle.write(json.dumps({"event": event, "t": at, "uid": uid, **fields}) + "\n")


def node_submissions(case: Case) -> list[tuple[int, int, int]]:
    """(node_rank, attempt, generation) of each node job submitted (not the store's)."""
    return [
        (e.data["node_rank"], e.data["attempt"], e.data["generation"])
        for e in case.events("submitted")
        if e.stage == TRAIN
    ]


def node_one_reported_gone(case: Case) -> float:
    """Node 1's trainer joined after its job started, then node 0's reported it gone."""
    joined = case.clock() + 0.5
    report(case, "n1r0p55", "arrived", joined, node_rank=1, gen=0)
    report(case, "n0r0p44", "gone", joined + 5, node_rank=0, gen=1, uids=["n1r0p55"])
    case.clock.advance(6)
    return joined


def test_a_node_silent_in_band_is_cancelled_then_replaced(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    node_one_reported_gone(case)
    job = str(case.row(1).job_id)
    assert case.tick() is None
    assert job not in case.executor.cancelled, "not before the agent had its grace to speak"
    case.clock.advance(GRACE_S)
    assert case.tick() is None
    assert case.executor.cancelled == [job]
    silent = last(case.events("node_silent"))
    assert (silent.data["node_rank"], silent.data["job_id"], silent.data["uid"]) == (1, job, "n1r0p55")
    # Repaired in the same tick, as an infrastructure failure: no waiting for Slurm to
    # confirm the end of a job on a node that no longer answers.
    assert node_submissions(case)[-1][:2] == (1, 2)
    assert last(case.events("failure")).data["klass"] == "infrastructure"
    # The replacement started after the lost process joined: it is never taken for it.
    case.set(1, JobState.RUNNING, node="n9")
    case.clock.advance(60)
    assert case.tick() is None
    assert case.executor.cancelled == [job]


def test_a_rank_its_agent_restarted_keeps_its_node_job(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    joined = node_one_reported_gone(case)
    report(case, "agent-n1-101", "rank_exit", joined + 4.6, node_rank=1, local_rank=0, pid=55, code=-9)
    case.clock.advance(60)
    assert case.tick() is None
    assert case.executor.cancelled == [] and not case.events("node_silent")


def test_nodes_carry_one_session_number_per_start(tmp_path: Path) -> None:
    """The ranks scope their store keys with it: a continue must not meet the last
    session's groups, and a replaced node must join its peers' session."""
    case = make_case(tmp_path, WAIT, nodes=2)
    assert node_submissions(case) == [(0, 1, 0), (1, 1, 0)]
    all_running(case)
    case.set(1, JobState.NODE_FAIL)
    assert case.tick() is None
    assert node_submissions(case)[-1] == (1, 2, 0), "the replacement joins session 0"
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=75)  # both checkpointed on a walltime signal
        write_json(case.run.exit_record(str(case.row(rank).job_id)), {"code": 75, "time": case.clock()})
    assert case.tick() is None
    assert [s[2] for s in node_submissions(case)[-2:]] == [1, 1], "the continue is session 1"


def test_a_finished_run_cancels_a_queued_replacement(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, "cluster.spares=1", nodes=2)
    all_running(case)
    case.set(2, JobState.NODE_FAIL)  # the spare's node died; its replacement queues
    assert case.tick() is None
    queued = str(case.row(2).job_id)
    write_json(case.run.done_flag, {"step": 36, "time": case.clock()})
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=0)
    assert case.tick() is StageStatus.COMPLETED
    assert queued in case.executor.cancelled
