"""Fault injection on the real test cluster: each scenario breaks a 2-node run mid-way
and the run must still COMPLETE, with the loss curve from the restored checkpoint on
matching an uninterrupted run with the same seed (1e-5 per step)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import faults

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _cluster_up() -> bool:
    try:
        return "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def root() -> Path:
    if not _cluster_up():
        pytest.skip("the test Slurm cluster is not up (make cluster-up, as root)")
    path = Path(tempfile.mkdtemp(prefix="fm9g-faults-", dir=Path.home()))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[int, float]:
    proc = faults.start_run(root, "reference")
    assert proc.wait(timeout=900) == 0, (root / "reference.supervisor.log").read_text()[-3000:]
    curve = faults.losses(root / "reference")
    assert sorted(curve) == list(range(1, 37))
    return curve


def finish(proc: subprocess.Popen[str], root: Path, name: str, timeout: float = 900) -> str:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    log = (root / f"{name}.supervisor.log").read_text()
    assert code == 0, log[-4000:]
    return log


def check_curve(root: Path, name: str, reference: dict[int, float]) -> None:
    run = root / name
    assert (run / "control" / "DONE").exists()
    curve = faults.losses(run)
    assert sorted(curve) == sorted(reference), "a step is missing or extra"
    worst = max(abs(curve[step] - reference[step]) for step in reference)
    assert worst <= 1e-5, f"loss differs from the uninterrupted run by {worst}"


def mid_run(root: Path, name: str, after_step: int = 10) -> Path:
    run = root / name
    faults.wait_for(lambda: faults.checkpoint_step(run) >= after_step and len(faults.live_jobs(run)) == 2,
                    600, f"{name} to pass step {after_step} on 2 running nodes")
    return run


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
    log = finish(proc, root, scenario)
    check_curve(root, scenario, reference)
    if scenario in ("scancel_worker", "scancel_master"):
        role = "worker" if scenario == "scancel_worker" else "master"
        # Only the killed role's node is resubmitted, and the supervisor says why.
        assert re.search(rf"submitted {role} node \d+ as job \d+ \(repair after infrastructure failure\)", log), (
            what, log[-3000:])
        assert log.count("submitted ") == 3, "only the failed node is resubmitted"
    if scenario == "walltime_signal":
        assert "continuing the run" in log


@pytest.mark.parametrize("role", ["worker", "master"])
def test_node_crash(root: Path, reference: dict[int, float], role: str) -> None:
    name = f"crash_{role}"
    proc = faults.start_run(root, name, reuse=root / "reference")
    run = mid_run(root, name)
    try:
        faults.crash_node(run, role)
        log = finish(proc, root, name, timeout=1200)  # the replacement runs on a spare node
    finally:
        faults.repair_nodes()
    assert "NODE_FAIL" in log or "infrastructure" in log
    check_curve(root, name, reference)


def test_supervisor_killed_then_resume(root: Path, reference: dict[int, float]) -> None:  # noqa: D103
    name = "resume"
    proc = faults.start_run(root, name, reuse=root / "reference")
    run = mid_run(root, name)
    os.killpg(proc.pid, signal.SIGKILL)  # the login session dies; the jobs do not
    proc.wait()
    resumed = subprocess.run(faults.cli("resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "re-adopting the live node jobs" in resumed.stdout
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
    proc = faults.start_run(root, "broken", "--set", f"cluster.python={broken}", "--set", "supervise.app_retries=2",
                            reuse=root / "reference")
    code = proc.wait(timeout=900)
    log = (root / "broken.supervisor.log").read_text()
    assert code == 1
    assert "retry budget is spent" in log or "has not advanced" in log, log[-3000:]
    assert log.count("repair after application failure") <= 2


def test_hang_watchdog_restarts_the_generation(root: Path, reference: dict[int, float]) -> None:
    name = "hang"
    proc = faults.start_run(root, name, "--set", "supervise.hang_timeout=40", reuse=root / "reference")
    run = mid_run(root, name)
    faults.freeze_trainer(run)
    log = finish(proc, root, name)
    assert "no training progress for 40s" in log
    check_curve(root, name, reference)
