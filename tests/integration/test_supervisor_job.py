"""supervise.where: job on the real test Slurm cluster: the command returns once the
supervisor job is submitted, the job runs the run to its end, and a supervisor job that is
signalled (walltime hand-over) or killed (scancel) is followed by another one that adopts
the training jobs without losing or repeating a step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fm9g.orchestrator.state import StageStatus
from tests.helpers import runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def launch(root: Path, name: str, iters: int) -> subprocess.CompletedProcess[str]:
    return runs.run_tiny(
        root,
        name,
        "--set",
        "supervise.where=job",
        "--set",
        f"train.train_iters={iters}",
        "--set",
        "train.save_iters=5",
        executor="slurm",
        timeout=120,
    )


def supervisor_job(run: Path) -> str:
    with runs.state(run) as store:
        return str(store.meta("supervisor_job") or "")


def started_ids(run: Path) -> list[str]:
    return [e.data["job_id"] for e in runs.events(run, "supervisor_job") if e.data.get("why") == "start"]


def train_completed(run: Path) -> bool:
    row = runs.stage(run) if (run / "state.db").exists() else None
    return row is not None and row.status is StageStatus.COMPLETED


def steps(run: Path) -> list[int]:
    return [int(record["step"]) for record in runs.metrics(run) if "loss" in record]


def cleanup(run: Path) -> None:
    subprocess.run(runs.cli("cancel", str(run)), capture_output=True, check=False)
    subprocess.run(["scancel", "--name", f"fm9g-{run.name}-supervisor"], check=False)


def test_command_returns_and_the_job_supervises_to_the_end(shared_tmp: Path) -> None:
    run = shared_tmp / "sj"
    result = launch(shared_tmp, "sj", iters=12)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert not train_completed(run)  # it returned before training could finish
        first = supervisor_job(run)
        assert first and f"Slurm job {first}" in result.stdout
        runs.wait_for(lambda: train_completed(run), 300, "the supervisor job to finish training")
        assert steps(run) == list(range(1, 13))
        started = [e for e in runs.events(run, "supervisor_job") if e.data.get("why") == "start"]
        assert [e.data["job_id"] for e in started] == [first]
        runs.wait_for(lambda: runs.events(run, "supervisor_end"), 60, "the supervisor job's clean end")
        status = subprocess.run(runs.cli("status", str(run), "--json"), capture_output=True, text=True, check=True)
        facts = json.loads(status.stdout)["runs"][0]
        assert facts["supervisor_job"] == first and facts["status"] == "COMPLETED"
    finally:
        cleanup(run)


def test_handover_and_scancel_lose_no_step(shared_tmp: Path) -> None:
    run = shared_tmp / "sk"
    iters = 30
    result = launch(shared_tmp, "sk", iters=iters)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        first = supervisor_job(run)
        runs.wait_for(lambda: runs.last_step(run) >= 2, 240, "training to start")
        # The walltime signal, early: the job hands over to a successor it submits.
        subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
        handover = runs.wait_for(lambda: runs.events(run, "supervisor_handover"), 60, "the hand-over event")
        second = handover[0].data["successor"]
        runs.wait_for(lambda: second in started_ids(run), 120, "the successor supervisor job to start")
        # A kill: the guard job Slurm holds for it takes over.
        assert runs.last_step(run) < iters, "training ended before the kill: raise train_iters"
        subprocess.run(["scancel", second], check=True)
        runs.wait_for(lambda: supervisor_job(run) not in ("", first, second), 120, "the guard supervisor job")
        runs.wait_for(lambda: train_completed(run), 400, "training to complete under the guard job")
        assert steps(run) == list(range(1, iters + 1))  # every step exactly once
        ids = started_ids(run)
        assert ids[:2] == [first, second] and len(ids) == 3
        guards = {e.data["guards"]: e.data["job_id"] for e in runs.events(run, "supervisor_guard")}
        assert ids[2] == guards[second]  # the one Slurm started when `second` was cancelled
    finally:
        cleanup(run)


def squeue_names() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout.split()


def test_cancel_reaches_the_supervisor_job(shared_tmp: Path) -> None:
    run = shared_tmp / "sc"
    result = launch(shared_tmp, "sc", iters=400)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs.wait_for(lambda: runs.last_step(run) >= 2, 240, "training to start")
        subprocess.run(runs.cli("cancel", str(run)), capture_output=True, text=True, check=True)
        row = runs.wait_for(
            lambda: (s := runs.stage(run)) is not None and s.status.ended and s, 120, "the train stage to end"
        )
        assert row.status is StageStatus.CANCELLED
        runs.wait_for(lambda: runs.events(run, "supervisor_end"), 60, "the supervisor job's clean end")
        # It exited 0, so Slurm dropped its guard: nothing of the run is left in the queue.
        runs.wait_for(lambda: not [n for n in squeue_names() if n.startswith("fm9g-sc-")], 60, "an empty queue")
        assert runs.last_step(run) < 400
    finally:
        cleanup(run)
