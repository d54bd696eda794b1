"""Actions a person takes on a run (cancel a run or a job); the CLI and the TUI both call
these, so a key press and a command do exactly the same thing."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from fm9g.orchestrator.executors import make_executor
from fm9g.orchestrator.jobs import cancel_jobs
from fm9g.orchestrator.reconcile import unsupervised
from fm9g.orchestrator.state import StageStatus, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import write_text


class CancelError(ValueError):
    """A cancel that cannot be done; the message says why and what to do."""


class CancelPath(str, enum.Enum):
    """Who cancels the jobs: the run's supervisor (asked through control/cancel), or
    this process through the executor (scancel, or a signal to a local job)."""

    SUPERVISOR = "supervisor"
    EXECUTOR = "executor"


@dataclass(frozen=True)
class CancelResult:
    path: CancelPath
    job_ids: tuple[str, ...]  # the live jobs concerned: handed to the supervisor, or cancelled here

    def describe(self) -> str:
        ids = " ".join(self.job_ids) or "-"
        if self.path is CancelPath.SUPERVISOR:
            return f"asked the run's supervisor to cancel {len(self.job_ids)} job(s): {ids}"
        return f"cancelled {len(self.job_ids)} job(s): {ids}"


def _executor_kind(run: RunDir, store: StateStore) -> str:
    """The executor that started the jobs: state.db says, else config.yaml."""
    kind = store.meta("executor")
    if kind:
        return str(kind)
    from fm9g.rundir.config import load_resolved

    return load_resolved(run.config).executor


def cancel_run(run: RunDir, job_id: str | None = None) -> CancelResult:
    """Cancel every live job of the run (or just `job_id`), and record which way it went.

    A whole-run cancel raises control/cancel first.  While a supervisor holds the run's
    lock, that flag is all this does: the supervisor cancels the jobs itself and records
    the run as cancelled (so viewers never call Slurm for it).  With no supervisor, this
    process cancels the jobs through the executor (scancel) under the run's lock, and
    records their end, since nobody else will.  One job is always cancelled through the
    executor (the flag names no job); a supervisor then sees it end and decides, as for
    any lost node."""
    if not run.state_db.exists():
        raise CancelError(f"{run.root} has no state.db: nothing was submitted, so nothing can be cancelled")
    store = StateStore(run.state_db)
    try:
        live = [row for row in store.jobs(live_only=True) if row.job_id]
        targets = [row for row in live if job_id is None or row.job_id == job_id]
        if job_id is not None and not targets:
            known = " ".join(str(row.job_id) for row in live) or "none"
            raise CancelError(
                f"job {job_id} is not a live job of run {run.name} (live jobs: {known}); "
                f"see `fm9g-launch status {run.root}`"
            )
        ids = tuple(str(row.job_id) for row in targets)
        what = f"job {job_id}" if job_id else "the run"
        with unsupervised(run) as free:
            if job_id is None:
                write_text(run.cancel_flag, f"{time.time()}\n")
            if job_id is None and not free:
                store.event(
                    "cancel",
                    f"user cancelled {what}: asked the supervisor through control/cancel to cancel "
                    f"{' '.join(ids) or 'no live jobs'}",
                    path=CancelPath.SUPERVISOR.value,
                    job_ids=list(ids),
                )
                return CancelResult(CancelPath.SUPERVISOR, ids)
            executor = make_executor(_executor_kind(run, store))
            # Recorded here only without a supervisor: one that runs sees the job end and decides.
            cancel_jobs(store, executor, targets, "cancelled by the user", record=free)
            why = "no supervisor holds the run's lock" if free else "one job: the supervisor sees it end and decides"
            store.event(
                "cancel",
                f"user cancelled {what} through the executor ({why}): {' '.join(ids) or 'no live jobs'}",
                path=CancelPath.EXECUTOR.value,
                job_ids=list(ids),
                supervised=not free,
            )
            if free and job_id is None:
                _end_stages_without_live_jobs(store)
            return CancelResult(CancelPath.EXECUTOR, ids)
    finally:
        store.close()


def _end_stages_without_live_jobs(store: StateStore) -> None:
    """No supervisor watches the run: end the stages that have no live job left."""
    live_stages = {row.stage for row in store.jobs(live_only=True)}
    for stage in store.stages():
        if not stage.status.ended and stage.name not in live_stages:
            store.set_stage(stage.name, StageStatus.CANCELLED, detail="cancelled by the user")


def resubmit_failed(run: RunDir) -> str:
    """Resubmit a run's failed nodes: start a detached supervisor (`fm9g-launch resume
    --detach`), which re-adopts live jobs and submits what is missing."""
    import subprocess
    import sys

    if not run.state_db.exists():
        raise ValueError(f"{run.root} has no state.db: nothing to resubmit")
    result = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "resume", str(run.root), "--detach"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or result.stdout.strip())
    return result.stdout.strip()
