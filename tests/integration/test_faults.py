"""Fault injection on the real test cluster: each scenario breaks a 2-node run mid-way
and the run must still COMPLETE, with the loss curve from the restored checkpoint on
matching an uninterrupted run with the same seed (1e-5 per step).  What the supervisor
did about the fault is read back from state.db's events and job rows."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fm9g.orchestrator.failures import FailureClass
from fm9g.orchestrator.state import StageStatus
from tests.helpers import faults, runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

INFRA = FailureClass.INFRA.value
APP = FailureClass.APP.value


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fm9g-faults-", dir=Path.home()))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[int, float]:
    return faults.reference_curve(root)


def finish(proc: subprocess.Popen[str], root: Path, name: str, timeout: float = 900) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    assert code == 0, (root / f"{name}.supervisor.log").read_text()[-4000:]


def check_curve(root: Path, name: str, reference: dict[int, float]) -> None:
    run = root / name
    assert (run / "control" / "DONE").exists()
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED
    curve = runs.losses(run)
    assert sorted(curve) == sorted(reference), "a step is missing or extra"
    worst = max(abs(curve[step] - reference[step]) for step in reference)
    assert worst <= 1e-5, f"loss differs from the uninterrupted run by {worst}"


def mid_run(root: Path, name: str, after_step: int = 10) -> Path:
    run = root / name
    runs.wait_for(
        lambda: runs.checkpoint_step(run) >= after_step and len(runs.live_jobs(run)) == 2,
        600,
        f"{name} to pass step {after_step} on 2 running nodes",
    )
    return run


def repairs(run: Path) -> list[runs.Submission]:
    """Submissions after the first attempt of each node: the supervisor's repairs."""
    return [s for s in runs.submissions(run) if s.attempt > 1]


SCENARIOS: dict[str, Callable[[Path], str]] = {
    "scancel_worker": faults.scancel_worker,
    "scancel_master": faults.scancel_master,
    "kill_trainer": faults.kill_trainer,
    "walltime_signal": faults.signal_walltime,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_soft_fault(root: Path, reference: dict[int, float], scenario: str) -> None:
    proc = faults.start_run(root, scenario, reuse=root / "reference")
    run = mid_run(root, scenario)
    what = SCENARIOS[scenario](run)
    finish(proc, root, scenario)
    check_curve(root, scenario, reference)
    if scenario in ("scancel_worker", "scancel_master"):
        rank = 1 if scenario == "scancel_worker" else 0
        # The cancelled job ended as an infrastructure failure, and only its node was
        # resubmitted (2 first submissions + 1 repair).
        assert any(f.node_rank == rank and f.klass == INFRA for f in runs.failures(run)), (what, runs.failures(run))
        assert len(runs.submissions(run)) == 3, runs.submissions(run)
        assert [s.node_rank for s in repairs(run)] == [rank]
    if scenario == "walltime_signal":
        # Every node checkpointed on the signal and the run continued (no retry budget spent).
        assert runs.events(run, "continue"), what


@pytest.mark.parametrize("role", ["worker", "master"])
def test_node_crash(root: Path, reference: dict[int, float], role: str) -> None:
    name = f"crash_{role}"
    proc = faults.start_run(root, name, reuse=root / "reference")
    run = mid_run(root, name)
    crashed = faults.job_of(run, role)
    try:
        faults.crash_node(run, role)
        finish(proc, root, name, timeout=1200)  # the replacement runs on a spare node
    finally:
        faults.repair_nodes()
    failures = runs.failures(run)
    assert any(f.job_id == crashed.job_id for f in failures), failures
    assert any(f.klass == INFRA for f in failures), failures
    check_curve(root, name, reference)


def test_supervisor_killed_then_resume(root: Path, reference: dict[int, float]) -> None:
    name = "resume"
    proc = faults.start_run(root, name, reuse=root / "reference")
    run = mid_run(root, name)
    os.killpg(proc.pid, signal.SIGKILL)  # the login session dies; the jobs do not
    proc.wait()
    submitted = runs.submissions(run)
    resumed = subprocess.run(runs.cli("resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # The resumed supervisor adopted the live node jobs: it submitted nothing new.
    assert runs.submissions(run) == submitted
    assert not runs.events(run, "restart")
    check_curve(root, name, reference)


def test_slurmctld_restart(root: Path, reference: dict[int, float]) -> None:
    name = "ctld"
    proc = faults.start_run(root, name, reuse=root / "reference")
    mid_run(root, name)
    faults.restart_slurmctld()
    finish(proc, root, name)
    check_curve(root, name, reference)


def test_failing_rank_stops_after_its_budget(root: Path, reference: dict[int, float]) -> None:
    """A node that fails on every start: a clear stop after its budget, not an endless loop."""
    broken = root / "broken-python"
    broken.write_text("#!/bin/sh\necho 'this interpreter always fails' >&2\nexit 1\n")
    broken.chmod(0o755)
    proc = faults.start_run(
        root,
        "broken",
        "--set",
        f"cluster.python={broken}",
        "--set",
        "supervise.app_retries=2",
        reuse=root / "reference",
    )
    code = proc.wait(timeout=900)
    run = root / "broken"
    assert code == 1, (root / "broken.supervisor.log").read_text()[-3000:]
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.FAILED
    assert runs.events(run, "stage_end")
    # Application failures, repaired at most app_retries=2 times before the stop
    # (the budget, or the stalled-checkpoint rule, ends it).
    assert {f.klass for f in runs.failures(run)} == {APP}
    assert len(repairs(run)) <= 2


def test_hang_watchdog_restarts_the_generation(root: Path, reference: dict[int, float]) -> None:
    name = "hang"
    proc = faults.start_run(root, name, "--set", "supervise.hang_timeout=40", reuse=root / "reference")
    run = mid_run(root, name)
    faults.freeze_trainer(run)
    finish(proc, root, name)
    assert runs.events(run, "hang")
    check_curve(root, name, reference)


def allocated_nodes(job_id: str) -> int:
    """How many nodes Slurm's accounting says job `job_id` held (sacct -X: the allocation)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NNodes"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out, f"sacct knows no job {job_id}"
    return int(out[0])


def test_together_worker_node_crash(root: Path, reference: dict[int, float]) -> None:
    """cluster.start: together takes both nodes as one allocation; when the worker's node
    crashes, the master's node trains on in it and a single-node job replaces the worker."""
    name = "together_crash"
    proc = faults.start_run(root, name, "--set", "cluster.start=together", reuse=root / "reference")
    run = mid_run(root, name)
    crashed = faults.job_of(run, "worker")
    try:
        faults.crash_node(run, "worker")
        finish(proc, root, name, timeout=1200)
    finally:
        faults.repair_nodes()
    check_curve(root, name, reference)
    first = [s for s in runs.submissions(run) if s.attempt == 1]
    assert sorted(s.node_rank for s in first) == [0, 1]
    assert len({s.job_id for s in first}) == 1, first  # one job for both nodes ...
    assert allocated_nodes(first[0].job_id) == 2  # ... holding both at once
    assert [(s.node_rank, s.role) for s in repairs(run)] == [(1, "worker")]
    replacement = repairs(run)[0]
    assert replacement.job_id != first[0].job_id and allocated_nodes(replacement.job_id) == 1
    failures = runs.failures(run)
    assert any(f.node_rank == 1 and f.job_id == crashed.job_id and f.klass == INFRA for f in failures), failures
