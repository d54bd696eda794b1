"""The store job of in-process recovery (supervise.on_node_loss wait/shrink): the plan's
store job and spares, its script, the policy keeping it alive beside the node jobs, the
combinations the plan refuses, and the real store host as a process.

The policy cases reuse test_train_policy's scripted executor (a fake of the project's
Executor protocol, not of Slurm) with the real JobTracker and StateStore."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.base import JobStatus
from fm9g.orchestrator.plan import STORE, TRAIN, node_slots, plan_run, store_spec
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.orchestrator.state import JobRow, JobState, StageStatus
from fm9g.orchestrator.store_job import STORE_START_FAILURES
from fm9g.rundir import RunDir, protocol
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_json
from fm9g.rundir.config import ConfigError
from fm9g.rundir.store_endpoint import StoreEndpoint, publish_store_endpoint, read_store_endpoint
from tests.helpers.runs import TINY
from tests.orchestrator.test_render import GOLDEN, HOSTILE, full_cluster
from tests.orchestrator.test_train_policy import Case, last, make_case

WAIT = "supervise.on_node_loss=wait"


# ------------------------------------------------------------------------- the plan


def plan_for(tmp_path: Path, *settings: str) -> tuple[list[tuple[str, str, int]], dict[str, str]]:
    """(stage, role, node_rank) of the train stage's jobs, and the plan's scripts."""
    config, _ = cfg.load(TINY, [f"run_root={tmp_path}", "executor=slurm", *settings])
    plan = plan_run(config, RunDir.of(tmp_path / "p"))
    jobs = [(job.stage, job.role, job.node_rank) for job in plan.stage(TRAIN).jobs]
    return jobs, plan.scripts


def test_the_plan_has_a_store_job_and_spares_only_under_wait_or_shrink(tmp_path: Path) -> None:
    jobs, scripts = plan_for(tmp_path, "cluster.nodes=2", "supervise.on_node_loss=shrink", "cluster.spares=1")
    assert jobs == [(STORE, "store", 0), (TRAIN, "master", 0), (TRAIN, "worker", 1), (TRAIN, "worker", 2)]
    store = scripts["store-a1.sbatch"]
    assert "#SBATCH --cpus-per-task=1" in store and "#SBATCH --mem=2G" in store
    assert "--gres" not in store and "--signal" not in store
    assert "-m fm9g.launchers.store_host --run-dir" in store

    jobs, scripts = plan_for(tmp_path, "cluster.nodes=2")
    assert jobs == [(TRAIN, "master", 0), (TRAIN, "worker", 1)]
    assert "store-a1.sbatch" not in scripts


def test_node_slots_count_spares_only_under_in_process_recovery() -> None:
    config, _ = cfg.load(None, ["cluster.nodes=3", "cluster.spares=2", WAIT])
    assert node_slots(config) == 5
    config, _ = cfg.load(None, ["cluster.nodes=3"])
    assert node_slots(config) == 3


def render_store(run_dir: str = "/shared/runs/demo", name: str = "demo") -> str:
    renderer = ScriptRenderer(
        run_name=name, run_dir=run_dir, cluster=full_cluster(), python="/opt/venv/bin/python", config_hash="0" * 12
    )
    return renderer.render(store_spec(), 1)


def test_golden_store_script(golden: Callable[[Path, str], None]) -> None:
    golden(GOLDEN / "store.sbatch", render_store())


def test_the_store_script_quotes_a_hostile_run_dir(tmp_path: Path) -> None:
    text = render_store(run_dir=f"/runs/{HOSTILE}", name="hostile")
    script = tmp_path / "store.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    assert shlex.split(exec_line)[-2:] == ["--run-dir", f"/runs/{HOSTILE}"]  # one word, never run


@pytest.mark.parametrize(
    "settings,field,fix",
    [
        (["model.backend=bmtrain", "supervise.on_node_loss=shrink"], "model.backend", "set model.backend: torch"),
        (["cluster.spares=1"], "cluster.spares", "set cluster.spares: 0, or supervise.on_node_loss: wait"),
        (["cluster.start=together", WAIT], "cluster.start", "set cluster.start: separate"),
    ],
)
def test_combinations_in_process_recovery_cannot_run_are_refused(
    tmp_path: Path, settings: list[str], field: str, fix: str
) -> None:
    config, _ = cfg.load(TINY, [f"run_root={tmp_path}", "executor=slurm", "cluster.nodes=2", *settings])
    run = RunDir.of(tmp_path / "p")
    with pytest.raises(ConfigError) as error:
        plan_run(config, run)
    assert field in str(error.value) and fix in str(error.value)
    assert not run.root.exists()


# ------------------------------------------------------------------------- the policy


def store_rows(case: Case) -> list[JobRow]:
    return case.store.jobs(STORE)


def set_store(case: Case, state: JobState, **fields: object) -> str:
    """What the next polls report for the newest store job; its job id."""
    job_id = str(store_rows(case)[-1].job_id)
    case.executor.statuses[job_id] = JobStatus(state, **fields)  # type: ignore[arg-type]
    return job_id


def all_running(case: Case) -> None:
    """Every node slot's newest job and the store RUNNING, then one tick."""
    for rank in case.policy.latest_rows():
        case.set(rank, JobState.RUNNING, node=f"n{rank}")
    set_store(case, JobState.RUNNING, node="c0")
    assert case.tick() is None


def test_the_store_job_is_submitted_first_and_is_no_node(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    assert [script.name for _, script in case.executor.submitted] == [
        "store-a1.sbatch",
        "train-master0-a1.sbatch",
        "train-worker1-a1.sbatch",
    ]
    (event,) = case.events("store_submitted")
    assert event.data == {"job_id": "100", "attempt": 1, "why": "start"}
    assert [(row.stage, row.role, row.job_id) for row in store_rows(case)] == [(STORE, "store", "100")]
    assert sorted(case.policy.latest_rows()) == [0, 1]  # keyed by node rank: the store is not one
    all_running(case)
    assert store_rows(case)[-1].state is JobState.RUNNING
    # A continue (every node checkpointed on a signal) starts the nodes again, not the store.
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=protocol.EXIT_CONTINUE)
    assert case.tick() is None
    assert case.events("continue") and len(case.events("store_submitted")) == 1


def test_a_lost_store_is_submitted_again_at_once(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    job_id = set_store(case, JobState.NODE_FAIL)
    publish_store_endpoint(case.run.store_endpoint, StoreEndpoint("c0", 4242, 3, job_id))
    write_json(case.run.exit_record(job_id), {"code": 1, "time": time.time(), "role": "store"})
    assert case.tick() is None
    lost = last(case.events("store_lost"))
    assert lost.data == {"job_id": job_id, "state": "NODE_FAIL", "exit_code": 1, "serial": 3}
    submitted = last(case.events("store_submitted"))
    assert submitted.data["attempt"] == 2 and submitted.data["why"] == "store lost"
    assert [row.attempt for row in store_rows(case)] == [1, 2] and store_rows(case)[-1].live
    # The nodes ran on: no failure, no repair, no node submitted again.
    assert not case.events("failure") and case.stage() is StageStatus.RUNNING
    assert len([e for e in case.events("submitted") if e.stage == TRAIN]) == 2


def test_stores_that_never_start_stop_the_stage(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    for attempt in range(1, STORE_START_FAILURES + 1):
        set_store(case, JobState.FAILED, exit_code=1)
        outcome = case.tick()
        assert last(case.events("store_lost")).data["serial"] is None
        assert (outcome is StageStatus.FAILED) == (attempt == STORE_START_FAILURES)
    assert "before they published rendezvous/store.json" in last(case.events("stage_end")).data["reason"]
    assert len(store_rows(case)) == STORE_START_FAILURES


def test_completion_cancels_the_store(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    store_id = str(store_rows(case)[-1].job_id)
    case.run.done_flag.parent.mkdir(parents=True, exist_ok=True)
    case.run.done_flag.touch()
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=0)
    assert case.tick() is StageStatus.COMPLETED
    assert store_id in case.executor.cancelled
    assert store_rows(case)[-1].state is JobState.CANCELLED
    assert not case.events("store_lost")


def test_a_user_cancel_cancels_the_store_with_the_nodes(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    store_id = str(store_rows(case)[-1].job_id)
    case.run.cancel_flag.parent.mkdir(parents=True, exist_ok=True)
    case.run.cancel_flag.touch()
    assert case.tick() is StageStatus.CANCELLED
    assert store_id in last(case.events("stage_end")).data["cancelled"]
    assert not case.events("store_lost")


def test_nodes_ending_without_done_fail_though_the_store_runs(tmp_path: Path) -> None:
    case = make_case(tmp_path, WAIT, nodes=2)
    all_running(case)
    for rank in (0, 1):
        case.set(rank, JobState.COMPLETED, exit_code=0)
    assert case.tick() is StageStatus.FAILED
    assert store_rows(case)[-1].state is JobState.CANCELLED


def test_spares_are_worker_slots_and_a_master_replacement_keeps_the_generation(tmp_path: Path) -> None:
    case = make_case(tmp_path, "supervise.on_node_loss=shrink", "cluster.spares=2", nodes=2)
    assert [(row.role, row.node_rank) for row in case.policy.latest_rows().values()] == [
        ("master", 0),
        ("worker", 1),
        ("worker", 2),
        ("worker", 3),
    ]
    all_running(case)
    case.set(0, JobState.NODE_FAIL, node="n0")
    assert case.tick() is None
    assert case.submissions()[-1] == (0, 2, 0, "repair after infrastructure failure")  # no generation + 1

    # A supervisor started again re-adopts the four node jobs and the store: nothing is submitted.
    again = make_case(tmp_path / "again", "supervise.on_node_loss=shrink", "cluster.spares=2", nodes=2)
    all_running(again)
    submitted = len(again.executor.submitted)
    again.policy.start()
    assert len(again.executor.submitted) == submitted and len(again.events("store_submitted")) == 1


def test_restart_mode_has_no_store_job(tmp_path: Path) -> None:
    case = make_case(tmp_path, nodes=2)
    assert not store_rows(case) and not case.events("store_submitted")
    case.running()
    case.set(1, JobState.NODE_FAIL)
    assert case.tick() is None and not case.events("store_lost")


# ------------------------------------------------------------------- the real store host


def start_store_host(run: RunDir) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["FM9G_HOST"] = "127.0.0.1"
    return subprocess.Popen(
        [sys.executable, "-m", "fm9g.launchers.store_host", "--run-dir", str(run.root), "--grace", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def published(run: RunDir, serial: int, child: subprocess.Popen[bytes], limit: float = 60.0) -> StoreEndpoint:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        endpoint = read_store_endpoint(run.store_endpoint)
        if endpoint is not None and endpoint.serial == serial:
            return endpoint
        assert child.poll() is None, child.communicate()[0].decode()
        time.sleep(0.1)
    raise AssertionError(f"no store.json with serial {serial} within {limit}s")


def test_the_store_host_serves_publishes_and_exits_on_done(tmp_path: Path) -> None:
    from torch.distributed import TCPStore

    run = RunDir.of(tmp_path / "run").make()
    for serial in (0, 1):
        child = start_store_host(run)
        try:
            endpoint = published(run, serial, child)
            assert endpoint.host == "127.0.0.1" and endpoint.job_id == f"pid{child.pid}"
            client = TCPStore(endpoint.host, endpoint.port, is_master=False, timeout=timedelta(seconds=10))
            client.set("probe", "hello")
            assert client.get("probe") == b"hello"
            del client
            run.done_flag.parent.mkdir(parents=True, exist_ok=True)
            run.done_flag.touch()
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
        record = json.loads(run.exit_record(endpoint.job_id).read_text())
        assert (record["code"], record["role"]) == (0, "store")
        run.done_flag.unlink()
