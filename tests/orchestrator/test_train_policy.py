"""The train stage's repair policy as a table of named cases, each in milliseconds.

`ScriptedExecutor` is a fake of the project's own Executor protocol (not of Slurm: the
Slurm layer is tested against the real cluster): it hands out job ids, answers each poll
with the statuses a case scripted, and records submissions and cancels.  The real
JobTracker and StateStore run on a tmp run directory; a fake clock and sleep stand in for
time.  Each case asserts on what state.db holds: events (kinds and data), job rows and the
stage's status."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.base import UNKNOWN, JobStatus, PollError
from fm9g.orchestrator.failures import FailureClass
from fm9g.orchestrator.jobs import JobTracker
from fm9g.orchestrator.recovery import Heartbeat, Recovery, RecoveryPhase
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.orchestrator.state import EventRow, JobRow, JobState, StageStatus, StateStore
from fm9g.orchestrator.train_policy import TrainPolicy
from fm9g.rundir import RunDir, protocol
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_json, write_text
from fm9g.rundir.endpoint import Endpoint, publish_endpoint

INFRA, APP, FATAL = FailureClass.INFRA.value, FailureClass.APP.value, FailureClass.FATAL.value


class FakeClock:
    """Time that moves only when a case moves it.  It starts at the real time because the
    StateStore stamps submissions itself (`submitted_at`); nothing asserts on either."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedExecutor:
    """The Executor protocol with scripted answers: `set` what the next polls report."""

    name: str = "slurm"
    usable: set[str] | None = None  # usable_nodes()'s answer
    statuses: dict[str, JobStatus] = field(default_factory=dict)
    submitted: list[tuple[str, Path]] = field(default_factory=list)  # (job id, script)
    cancelled: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    failing_polls: int = 0  # the next this many polls raise PollError
    next_id: int = 100

    def submit(
        self,
        script: Path,
        *,
        log: Path,
        tag: str,
        env: dict[str, str] | None = None,
        after: Sequence[str] = (),
        array: int | None = None,
    ) -> str:
        job_id = str(self.next_id)
        self.next_id += 1
        self.statuses[job_id] = JobStatus(JobState.PENDING)
        self.submitted.append((job_id, script))
        return job_id

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        if self.failing_polls:
            self.failing_polls -= 1
            raise PollError("slurmctld did not answer (scripted)")
        return {job_id: self.statuses.get(job_id, UNKNOWN) for job_id in job_ids}

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled.extend(job_ids)

    def adopt(self, job_id: str, log: Path) -> None:
        self.adopted.append(job_id)

    def usable_nodes(self) -> set[str] | None:
        return self.usable

    def job_env(self, jobs_at_once: int) -> dict[str, str]:
        return {}

    def tick_interval(self, configured: float) -> float:
        return configured


@dataclass
class Case:
    """One policy on a fresh run directory, and the means to script it."""

    run: RunDir
    store: StateStore
    executor: ScriptedExecutor
    clock: FakeClock
    policy: TrainPolicy
    config: cfg.RunConfig

    def row(self, rank: int) -> JobRow:
        """The newest job row of node `rank`."""
        return self.policy.latest_rows()[rank]

    def set(self, rank: int, state: JobState, **fields: object) -> None:
        """What the next polls report for node `rank`'s newest job."""
        self.executor.statuses[str(self.row(rank).job_id)] = JobStatus(state, **fields)  # type: ignore[arg-type]

    def running(self) -> StageStatus | None:
        """Every node's newest job RUNNING on node n<rank>, then one tick."""
        for rank in range(self.config.cluster.nodes):
            self.set(rank, JobState.RUNNING, node=f"n{rank}")
        return self.tick()

    def tick(self) -> StageStatus | None:
        self.clock.advance(1)
        return self.policy.tick()

    def events(self, kind: str | None = None) -> list[EventRow]:
        return self.store.events(kind)

    def kinds(self, since: int = 0) -> list[str]:
        return [event.kind for event in self.store.events(since_id=since)]

    def stage(self) -> StageStatus:
        stage = self.store.stage("train")
        assert stage is not None
        return stage.status

    def submissions(self) -> list[tuple[int, int, int, str]]:
        """(node_rank, attempt, generation, why) of every `submitted` event."""
        return [
            (e.data["node_rank"], e.data["attempt"], e.data["generation"], e.data["why"])
            for e in self.events("submitted")
        ]

    def heartbeat(self, rank: int, step: int, *, time: float, started: float, start_step: int = 0) -> None:
        write_json(
            self.run.heartbeat(rank),
            {"step": step, "time": time, "pid": 1, "generation": 0, "started": started, "start_step": start_step},
        )

    def checkpoint(self, step: int) -> None:
        write_text(self.run.latest_pointer, f"{step}\n")


def make_case(
    tmp_path: Path, *settings: str, nodes: int = 2, usable: set[str] | None = None, start: bool = True
) -> Case:
    run = RunDir.of(tmp_path / "run").make()
    config, _ = cfg.load(None, [f"cluster.nodes={nodes}", "executor=slurm", "supervise.poll_interval=1", *settings])
    write_text(run.config, cfg.dump(config))
    store = StateStore(run.state_db)
    clock = FakeClock()
    executor = ScriptedExecutor(usable=usable)
    renderer = ScriptRenderer(
        run_name=run.name, run_dir=str(run.root), cluster=config.cluster, python="python3", config_hash="0" * 12
    )
    tracker = JobTracker(run, store, executor, renderer, requeue=config.cluster.requeue, clock=clock)
    policy = TrainPolicy(run, config, store, tracker, clock=clock, sleep=lambda _: None)
    case = Case(run, store, executor, clock, policy, config)
    if start:
        policy.start()
    return case


def last(events: list[EventRow]) -> EventRow:
    assert events, "no such event"
    return events[-1]


# ---------------------------------------------------------------------------- the table


def test_start_submits_every_node_once(tmp_path: Path) -> None:
    case = make_case(tmp_path, nodes=3)
    assert case.submissions() == [(0, 1, 0, "start"), (1, 1, 0, "start"), (2, 1, 0, "start")]
    assert [row.role for row in case.policy.latest_rows().values()] == ["master", "worker", "worker"]
    assert case.stage() is StageStatus.RUNNING
    assert case.running() is None and all(row.state is JobState.RUNNING for row in case.store.jobs("train"))


def test_worker_node_fail_is_repaired_from_the_infra_budget(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    worker = case.row(1)
    case.set(1, JobState.NODE_FAIL, node="n1")
    assert case.tick() is None
    failure = last(case.events("failure"))
    assert (failure.data["klass"], failure.data["node_rank"], failure.data["role"], failure.data["node"]) == (
        INFRA,
        1,
        "worker",
        "n1",
    )
    assert failure.job == worker.id
    assert case.submissions()[-1] == (1, 2, 0, "repair after infrastructure failure")
    assert case.store.meta("retries_used") == {INFRA: 1}
    assert case.row(1).attempt == 2 and case.row(1).state is JobState.PENDING
    assert case.row(0).attempt == 1 and case.row(0).state is JobState.RUNNING
    assert case.executor.cancelled == [] and case.stage() is StageStatus.RUNNING


def test_master_failure_bumps_the_generation(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    publish_endpoint(case.run.endpoint, Endpoint("n0", 29500, generation=4, job_id="100", rdzv_id="run-4"))
    case.running()
    case.set(0, JobState.FAILED, exit_code=1)
    case.tick()
    assert last(case.events("failure")).data["klass"] == APP
    assert case.submissions()[-1] == (0, 2, 5, "repair after application failure")
    assert case.row(0).generation == 5 and case.row(1).attempt == 1  # the worker keeps its job


def test_worker_replacement_joins_the_running_generation(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    publish_endpoint(case.run.endpoint, Endpoint("n0", 29500, generation=4, job_id="100", rdzv_id="run-4"))
    case.running()
    case.set(1, JobState.FAILED, exit_code=1)
    case.tick()
    assert case.row(1).generation == 4


def test_app_budget_spent_stops_failed(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.app_retries=1")
    case.running()
    case.checkpoint(5)
    case.set(1, JobState.FAILED, exit_code=1)
    case.tick()
    case.set(1, JobState.RUNNING, node="n1")
    case.tick()
    case.checkpoint(10)
    case.set(1, JobState.FAILED, exit_code=1)
    assert case.tick() is StageStatus.FAILED
    assert [e.data["klass"] for e in case.events("failure")] == [APP, APP]
    end = last(case.events("stage_end"))
    assert end.data["status"] == "FAILED" and "application retry budget is spent" in end.data["reason"]
    assert len(case.executor.submitted) == 3  # two starts and one repair, none after the budget
    assert case.executor.cancelled == [case.row(0).job_id] and case.row(0).state is JobState.CANCELLED
    assert case.stage() is StageStatus.FAILED
    assert case.tick() is StageStatus.FAILED  # a stopped stage stays stopped


def test_config_error_stops_without_resubmitting_and_names_the_reason(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    write_json(case.run.fatal_record, {"reason": "data.dataset_config: no such file mix.json", "rank": 0})
    case.set(0, JobState.FAILED, exit_code=protocol.EXIT_CONFIG)
    assert case.tick() is StageStatus.FAILED
    failure = last(case.events("failure"))
    assert failure.data["klass"] == FATAL and "no such file mix.json" in failure.data["reason"]
    assert "no such file mix.json" in last(case.events("stage_end")).data["reason"]
    assert len(case.executor.submitted) == 2 and case.store.meta("retries_used") is None
    assert case.executor.cancelled == [case.row(1).job_id]


def test_full_disk_stops_with_the_resume_command(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    write_json(case.run.fatal_record, {"reason": "no space left on /scratch", "exit_code": protocol.EXIT_NO_SPACE})
    case.set(1, JobState.FAILED, exit_code=protocol.EXIT_NO_SPACE)
    assert case.tick() is StageStatus.FAILED
    failure = last(case.events("failure"))
    assert failure.data["klass"] == FATAL and "no space left on /scratch" in failure.data["reason"]
    assert f"fm9g-launch resume {case.run.root}" in failure.data["reason"]
    assert len(case.executor.submitted) == 2


def test_exit_code_from_the_agents_record_when_the_poll_has_none(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    write_json(case.run.exit_record(str(case.row(1).job_id)), {"code": protocol.EXIT_CONFIG})
    case.set(1, JobState.FAILED)  # squeue saw the end; sacct has no exit code yet
    assert case.tick() is StageStatus.FAILED
    assert last(case.events("failure")).data["klass"] == FATAL
    assert case.store.job(last(case.events("failure")).job or 0).exit_code == protocol.EXIT_CONFIG  # type: ignore[union-attr]


def test_user_cancel_ends_cancelled(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    write_text(case.run.cancel_flag, "now\n")
    case.set(1, JobState.CANCELLED)
    assert case.tick() is StageStatus.CANCELLED
    assert last(case.events("failure")).data["klass"] == FATAL
    assert last(case.events("stage_end")).data["status"] == "CANCELLED"
    assert len(case.executor.submitted) == 2 and case.stage() is StageStatus.CANCELLED


def test_cancel_flag_alone_cancels_the_running_jobs(tmp_path: Path) -> None:
    """`fm9g-launch cancel` on a supervised run only raises the flag: the policy cancels."""
    case = make_case(tmp_path)
    case.running()
    write_text(case.run.cancel_flag, "now\n")
    assert case.tick() is StageStatus.CANCELLED
    assert sorted(case.executor.cancelled) == sorted(str(case.row(r).job_id) for r in (0, 1))
    assert all(row.state is JobState.CANCELLED for row in case.store.jobs("train"))
    assert case.kinds()[-1] == "stage_end" and not case.events("failure")


def test_requeued_by_slurm_is_not_resubmitted(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    worker = case.row(1)
    case.set(1, JobState.PENDING, restarts=1)  # same job id, back in the queue
    mark = case.store.max_event_id()
    assert case.tick() is None
    assert case.kinds(mark) == ["requeued_by_slurm"]
    assert case.row(1).id == worker.id and case.row(1).restarts == 1
    assert len(case.executor.submitted) == 2


def test_cluster_requeue_node_fail_is_requeued_not_repaired(tmp_path: Path) -> None:
    case = make_case(tmp_path, "cluster.requeue=true")
    case.running()
    case.set(1, JobState.NODE_FAIL, node="n1")
    mark = case.store.max_event_id()
    case.tick()
    assert case.kinds(mark) == ["requeued_by_slurm"]
    assert case.row(1).state is JobState.REQUEUED and case.row(1).attempt == 1
    assert len(case.executor.submitted) == 2 and not case.events("failure")


def test_failed_poll_records_poll_error_and_nothing_else(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    rows = case.store.jobs()
    case.set(1, JobState.NODE_FAIL)
    case.executor.failing_polls = 1
    mark = case.store.max_event_id()
    assert case.tick() is None
    assert case.kinds(mark) == ["poll_error"]
    assert case.store.jobs() == rows and len(case.executor.submitted) == 2


def test_unknown_status_changes_nothing(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    rows = case.store.jobs()
    case.set(1, JobState.UNKNOWN)
    del case.executor.statuses[str(case.row(0).job_id)]  # not seen at all: UNKNOWN too
    mark = case.store.max_event_id()
    case.clock.advance(10_000)  # past every watchdog: a tick that cannot see its jobs concludes nothing
    assert case.tick() is None
    assert case.kinds(mark) == [] and case.store.jobs() == rows
    assert case.executor.cancelled == [] and len(case.executor.submitted) == 2


def test_node_failing_twice_is_excluded(tmp_path: Path) -> None:
    case = make_case(tmp_path, usable={"n0", "n1", "n2"})
    case.running()
    for attempt in (1, 2):
        case.checkpoint(attempt * 10)
        case.set(1, JobState.NODE_FAIL, node="n1")
        case.tick()
        if attempt == 1:
            case.set(1, JobState.RUNNING, node="n1")
            case.tick()
    exclude = last(case.events("exclude"))
    assert (exclude.data["nodes"], exclude.data["applied"], exclude.data["failures"]) == (["n1"], True, 2)
    assert case.store.meta("node_failures") == {"n1": 2}
    script = case.executor.submitted[-1][1].read_text()
    assert "#SBATCH --exclude=n1" in script
    assert "--exclude" not in case.executor.submitted[-2][1].read_text()  # the first repair excluded nothing


def test_exclusion_that_leaves_too_few_nodes_is_dropped(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.exclude_after=1", usable={"n0", "n1"})
    case.running()
    case.set(1, JobState.NODE_FAIL, node="n1")
    case.tick()
    applied, dropped = case.events("exclude")
    assert (applied.data["nodes"], applied.data["applied"]) == (["n1"], True)
    assert (dropped.data["nodes"], dropped.data["applied"]) == (["n1"], False)
    assert "--exclude" not in case.executor.submitted[-1][1].read_text()
    assert case.submissions()[-1][:2] == (1, 2)  # repaired all the same


def test_excluded_node_unknown_to_the_cluster_is_not_named(tmp_path: Path) -> None:
    case = make_case(tmp_path, usable={"n0", "n1", "n2"})
    now = case.clock()
    case.store.set_meta("excluded", {"ghost7": now + 3600, "n2": now + 3600, "n1": now - 1})
    assert case.policy.cluster_config().exclude == ["n2"]  # ghost7 unknown to sinfo; n1's expired


def test_checkpoints_not_advancing_stop_the_stage(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.stall_checkpoints=2")
    case.running()
    case.checkpoint(5)
    for _ in range(2):
        case.set(1, JobState.NODE_FAIL, node="n1")
        assert case.tick() is None
        case.set(1, JobState.RUNNING, node="n1")
        case.tick()
    case.set(1, JobState.NODE_FAIL, node="n1")
    assert case.tick() is StageStatus.FAILED
    assert "has not advanced over 2 recoveries" in last(case.events("stage_end")).data["reason"]
    assert case.store.meta("checkpoint_at_failure") == [5, 5, 5]
    assert len(case.executor.submitted) == 4  # two starts, two repairs


def test_hang_cancels_the_master_and_its_end_starts_a_new_generation(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.hang_timeout=60")
    case.running()
    case.heartbeat(0, 7, time=case.clock(), started=case.clock())
    case.clock.advance(30)
    assert case.tick() is None and not case.events("hang")  # within the bound
    case.clock.advance(60)
    case.tick()
    master = case.row(0)
    hang = last(case.events("hang"))
    assert (hang.data["node_rank"], hang.data["job_id"], hang.data["timeout"]) == (0, master.job_id, 60)
    assert case.executor.cancelled == [master.job_id]
    assert master.state is JobState.RUNNING  # stays live until a poll sees it end
    case.tick()
    assert len(case.events("hang")) == 1  # not cancelled twice
    case.set(0, JobState.CANCELLED)
    case.tick()
    failure = last(case.events("failure"))
    assert failure.data["klass"] == APP and "hang_timeout" in failure.data["reason"]
    assert case.submissions()[-1] == (0, 2, 1, "repair after application failure")
    assert case.store.meta("retries_used") == {APP: 1}


def test_replacement_pending_too_long_means_a_full_restart(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.replacement_timeout=100")
    case.running()
    case.set(1, JobState.NODE_FAIL, node="n1")
    case.tick()
    master = case.row(0)
    case.clock.advance(50)
    assert case.tick() is None and not case.events("full_restart")
    case.clock.advance(100)
    case.tick()
    restart = last(case.events("full_restart"))
    assert restart.data["node_rank"] == 1 and "replacement_timeout" in restart.message
    assert master.job_id in case.executor.cancelled
    assert case.submissions()[-2:] == [(0, 3, 0, "full restart"), (1, 3, 0, "full restart")]
    assert case.store.meta("retries_used") == {INFRA: 1}  # the restart itself spends nothing
    case.clock.advance(1000)
    case.tick()
    assert len(case.events("full_restart")) == 1  # nobody holds an allocation: no bound


def test_every_node_checkpointed_on_a_signal_continues_without_a_budget(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    case.set(0, JobState.FAILED, exit_code=protocol.EXIT_CONTINUE)
    assert case.tick() is None and not case.events("continue")  # the worker still runs
    case.set(1, JobState.COMPLETED, exit_code=protocol.EXIT_CONTINUE)
    assert case.tick() is None
    assert [e.data["klass"] for e in case.events("failure")] == ["continue", "continue"]
    assert last(case.events("continue")).data["node_ranks"] == [0, 1]
    assert case.submissions()[-2:] == [(0, 2, 0, "continue"), (1, 2, 0, "continue")]
    assert case.store.meta("retries_used") is None and case.stage() is StageStatus.RUNNING


def test_done_flag_and_every_node_ended_completes(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    write_text(case.run.done_flag, "")
    write_json(case.run.summary, {"final_step": 30, "first_loss": 9.1, "last_loss": 4.2})
    case.set(0, JobState.COMPLETED, exit_code=0)
    assert case.tick() is None  # the worker has not ended yet
    case.set(1, JobState.FAILED, exit_code=1)  # after DONE an end is no failure
    assert case.tick() is StageStatus.COMPLETED
    assert not case.events("failure") and last(case.events("stage_end")).data["status"] == "COMPLETED"
    stage = case.store.stage("train")
    assert stage is not None and stage.progress == 1.0 and stage.detail == "step 30, loss 9.1 -> 4.2"


def test_every_node_ended_without_done_fails(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=0)
    assert case.tick() is StageStatus.FAILED
    assert not case.events("failure")  # exit 0 is no failure of its own
    assert "training did not finish" in last(case.events("stage_end")).data["reason"]


def test_resume_re_adopts_live_jobs_without_submitting(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    # The supervisor dies; a new one (new tracker, same jobs) starts on the same run.
    executor = ScriptedExecutor(statuses=dict(case.executor.statuses))
    renderer = case.policy.tracker.renderer
    tracker = JobTracker(case.run, case.store, executor, renderer, clock=case.clock)
    resumed = TrainPolicy(case.run, case.config, case.store, tracker, clock=case.clock, sleep=lambda _: None)
    mark = case.store.max_event_id()
    resumed.start()
    assert executor.submitted == [] and sorted(executor.adopted) == sorted(str(case.row(r).job_id) for r in (0, 1))
    assert case.kinds(mark) == [] and case.stage() is StageStatus.RUNNING


def test_resume_submits_only_the_node_that_ended_unwatched(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    executor = ScriptedExecutor(statuses=dict(case.executor.statuses), next_id=200)
    executor.statuses[str(case.row(1).job_id)] = JobStatus(JobState.NODE_FAIL)
    tracker = JobTracker(case.run, case.store, executor, case.policy.tracker.renderer, clock=case.clock)
    TrainPolicy(case.run, case.config, case.store, tracker, clock=case.clock, sleep=lambda _: None).start()
    assert [job_id for job_id, _ in executor.submitted] == ["200"]
    assert case.submissions()[-1] == (1, 2, 0, "start")


def test_repair_off_stops_naming_the_last_checkpoint(tmp_path: Path) -> None:
    case = make_case(tmp_path, "executor=local")
    assert not case.policy.repairs
    case.running()
    case.checkpoint(10)
    case.set(1, JobState.FAILED, exit_code=1)
    assert case.tick() is StageStatus.FAILED
    assert last(case.events("failure")).data["klass"] == APP
    reason = last(case.events("stage_end")).data["reason"]
    assert "the last checkpoint is step 10" in reason and case.row(1).log in reason
    assert len(case.executor.submitted) == 2


@pytest.mark.parametrize(
    "executor,repair_local,repairs",
    [
        ("slurm", False, True),
        ("local", False, False),
        ("local", True, True),
    ],
)
def test_repair_rule(tmp_path: Path, executor: str, repair_local: bool, repairs: bool) -> None:
    case = make_case(
        tmp_path, f"executor={executor}", f"supervise.repair_local={str(repair_local).lower()}", start=False
    )
    assert case.policy.repairs is repairs


def test_restarting_a_failed_stage_refills_the_budgets(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.app_retries=0")
    case.running()
    write_json(case.run.fatal_record, {"reason": "bad mixture"})
    case.set(1, JobState.FAILED, exit_code=1)
    assert case.tick() is StageStatus.FAILED
    case.store.set_meta("retries_used", {APP: 3})
    case.policy.start()
    restart = last(case.events("restart"))
    assert restart.data["previous"] == "FAILED"
    assert case.store.meta("retries_used") == {} and case.stage() is StageStatus.RUNNING
    assert case.submissions()[-2:] == [(0, 2, 0, "start"), (1, 2, 0, "start")]
    assert not case.run.fatal_record.exists()  # the agents would exit 78 at once


def test_recovery_timeline_phases(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    case.heartbeat(0, 12, time=case.clock(), started=case.clock() - 100)
    detected = case.clock() + 0.5
    case.set(1, JobState.NODE_FAIL, node="n1", ended_at=detected)
    case.tick()
    case.set(1, JobState.RUNNING, node="n2", started_at=detected + 20)
    case.tick()
    assert not case.events("recovery")
    case.heartbeat(1, 12, time=detected + 25, started=detected + 25, start_step=12)  # passed the rendezvous
    case.tick()
    assert not case.events("recovery")
    case.heartbeat(1, 13, time=detected + 27, started=detected + 25, start_step=12)  # the first step
    case.tick()
    case.tick()
    (recovery,) = case.events("recovery")
    phases = recovery.data["phases"]
    assert list(phases) == [phase.value for phase in RecoveryPhase]
    assert (phases["detected"], phases["allocated"], phases["rendezvous"], phases["first_step"]) == (
        detected,
        detected + 20,
        detected + 25,
        detected + 27,
    )
    assert recovery.data["node_rank"] == 1 and recovery.data["step_at_failure"] == 12


def test_first_step_is_the_trainers_own_first_step_time_not_its_latest_heartbeat(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    detected = case.clock() + 0.5
    case.set(1, JobState.NODE_FAIL, node="n1", ended_at=detected)
    case.tick()
    case.set(1, JobState.RUNNING, node="n2", started_at=detected + 20)
    case.tick()
    # Seen a tick late: by now the trainer has taken three steps; its first ended at +26.
    write_json(
        case.run.heartbeat(1),
        {
            "step": 15,
            "time": detected + 29,
            "pid": 1,
            "generation": 0,
            "started": detected + 25,
            "start_step": 12,
            "first_step_at": detected + 26,
        },
    )
    case.tick()
    (recovery,) = case.events("recovery")
    assert recovery.data["phases"]["first_step"] == detected + 26


def test_recovery_fields_follow_the_phases() -> None:
    recovery = Recovery(id=1, node_rank=1, new_job_row=2, step_at_failure=0, detected=1.0, resubmitted=2.0)
    assert recovery.phases() == {"detected": 1.0, "resubmitted": 2.0}
    for phase in RecoveryPhase:
        assert hasattr(recovery, phase.value)
    assert Heartbeat.parse(0, {"step": "x"}) is None and Heartbeat.parse(0, None) is None


def test_run_until_done_sleeps_through_the_injected_sleep(tmp_path: Path) -> None:
    case = make_case(tmp_path, start=False)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            for rank in (0, 1):
                case.set(rank, JobState.RUNNING, node=f"n{rank}")
        elif len(sleeps) == 3:
            write_text(case.run.done_flag, "")
            for rank in (0, 1):
                case.set(rank, JobState.COMPLETED, exit_code=0)

    case.policy.sleep = sleep
    assert case.policy.run_until_done() is StageStatus.COMPLETED
    assert sleeps == [1.5, 1.0, 1.5]  # a tick that changed nothing backs off; a change resets it


def test_interval_backs_off_and_resets(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.tick()
    case.tick()
    assert case.policy.interval > case.policy.base_interval
    case.running()
    assert case.policy.interval == case.policy.base_interval
