"""Actions a person takes on a run (cancel a run or a job); the CLI and the TUI both call
these, so a key press and a command do exactly the same thing."""

from __future__ import annotations

from pathlib import Path

from fm9g.rundir.config import load_resolved
from fm9g.orchestrator.executors import make_executor
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.supervisor import write_cancel_flag


def cancel_run(run: RunDir, job_id: str | None = None) -> list[str]:
    """Cancel every live job of the run (or just `job_id`); returns the ids cancelled.

    A whole-run cancel first raises control/cancel, so the supervisor reads the ends as
    a user's decision (do-not-retry) rather than failures to repair."""
    config = load_resolved(run.config)
    store = StateStore(run.state_db)
    try:
        live = [row for row in store.jobs(live_only=True) if row.job_id]
        targets = [row for row in live if job_id is None or row.job_id == job_id]
        if job_id is None:
            write_cancel_flag(run)
        executor = make_executor(config.executor)
        for row in targets:
            executor.adopt(str(row.job_id), Path(row.log))
        ids = [str(row.job_id) for row in targets]
        if ids:
            executor.cancel(ids)
        store.event("cancel", f"user cancelled {'job ' + job_id if job_id else 'the run'}: {' '.join(ids) or 'no live jobs'}")
        return ids
    finally:
        store.close()


def resubmit_failed(run: RunDir) -> str:
    """Resubmit a run's failed nodes: start a detached supervisor (`fm9g-launch resume
    --detach`), which re-adopts live jobs and submits what is missing."""
    import subprocess
    import sys

    if not run.state_db.exists():
        raise ValueError(f"{run.root} has no state.db: nothing to resubmit")
    result = subprocess.run([sys.executable, "-m", "fm9g.orchestrator.cli", "resume", str(run.root), "--detach"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or result.stdout.strip())
    return result.stdout.strip()
