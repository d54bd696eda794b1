"""The index stage on the real test Slurm cluster: its array and merge jobs are tracked
rows that `status`, `cancel` and a restarted slurmctld all see the way a user expects.

`cluster.setup` gets a `sleep`, so each job stays queued or running long enough to be
looked at, cancelled, or to live through a controller restart."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import faults, runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SLOW_JOBS = (
    "--set",
    "cluster.setup=['sleep 12']",
    "--set",
    "train.train_iters=4",
    "--set",
    "train.save_iters=2",
    "--set",
    "train.warmup_iters=1",
)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fm9g-index-", dir=Path.home()))  # the nodes see $HOME
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def index_rows(run: Path) -> list[dict]:
    """The index jobs `status --json` lists for `run` (none before the run exists)."""
    if not (run / "state.db").exists():
        return []
    status = subprocess.run(runs.cli("status", str(run), "--json"), capture_output=True, text=True, check=True)
    jobs = json.loads(status.stdout)["runs"][0].get("jobs") or []
    return [job for job in jobs if job["stage"].startswith("index:")]


def submitted_index_rows(run: Path) -> list[dict] | None:
    rows = index_rows(run)
    return rows if len(rows) == 4 and all(row["job_id"] for row in rows) else None


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%F %T", "--states=all", "-j", ",".join(job_ids)], capture_output=True, text=True
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_status_lists_index_jobs_and_cancel_cancels_them(root: Path) -> None:
    proc = runs.start_tiny(root, "idx", *SLOW_JOBS, "--nodes", "4", executor="slurm", log=root / "idx.log")
    run = root / "idx"
    try:
        rows = runs.wait_for(lambda: submitted_index_rows(run), 120, "four index jobs in status --json")
        assert sorted((row["stage"], row["role"]) for row in rows) == [
            ("index:en", "merge"),
            ("index:en", "shard"),
            ("index:zh", "merge"),
            ("index:zh", "shard"),
        ]
        ids = [str(row["job_id"]) for row in rows]
        assert all(job_id.isdigit() for job_id in ids)  # Slurm job ids
        assert set(squeue_states(ids)) >= set(ids)  # they really are in the queue
        subprocess.run(runs.cli("cancel", str(run)), check=True, capture_output=True, timeout=60)
        assert proc.wait(timeout=180) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    runs.wait_for(
        lambda: not any(state in ("PENDING", "RUNNING") for state in squeue_states(ids).values()),
        60,
        "the index jobs to leave the queue",
    )
    with runs.state(run) as store:
        assert all(row.state.is_terminal for row in store.jobs())
        assert store.events("cancel")
        assert not store.jobs("train"), "nothing past indexing was submitted"


def test_slurmctld_restart_during_indexing_does_not_crash_the_run(root: Path) -> None:
    proc = runs.start_tiny(root, "blip", *SLOW_JOBS, executor="slurm", log=root / "blip.log")
    run = root / "blip"
    try:
        # An operator's restart (SIGTERM: slurmctld saves its state, then is down for a few
        # seconds); a SIGKILL, a crash, would also lose the jobs it had not saved yet.
        runs.wait_for(
            lambda: [r for r in index_rows(run) if r["role"] == "shard" and r["state"] == "RUNNING"] or None,
            120,
            "the shard jobs to run",
        )
        faults.restart_slurmctld(signal.SIGTERM)
        assert proc.wait(timeout=900) == 0, (root / "blip.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    with runs.state(run) as store:
        assert all(stage.status.value == "COMPLETED" for stage in store.stages())
        assert store.stage("train") is not None
