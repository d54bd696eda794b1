"""`reconcile`: bring a run's state.db up to date from the files its jobs left behind,
while no supervisor watches the run.

After `kill -9` of a supervisor its jobs run on and end by themselves, and nobody
polls them: state.db would say RUNNING forever.  Every job leaves files as it ends,
though: the node agent's exit record (`control/exits/<job_id>.json`), the local
executor's `<log>.rc`, and rank 0's `control/DONE` when training finished.  Reconcile
reads only those files (viewers never call Slurm) and writes only while no supervisor
holds the run's lock: a live supervisor is its run's one writer and sees the same ends
at its next poll.  `status` and the TUI call it before they read; `resume` can call it
with `holding_lock=True` once it holds the lock itself.
"""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fm9g.orchestrator.executors.local import end_state
from fm9g.orchestrator.state import JobRow, JobState, StageRow, StageStatus, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.protocol import read_exit_code

# An exit record is written on a compute node, `submitted_at` on the login node: allow
# this much clock skew before calling a record older than its job a stale one (a local
# job id is a pid, and a pid can come back within one run).
CLOCK_SKEW_S = 60.0
EVENT = "reconciled"


@dataclass(frozen=True)
class JobEnd:
    """How one live row's job ended, as its files tell."""

    row: JobRow
    state: JobState
    exit_code: int
    ended_at: float
    source: Path


@dataclass(frozen=True)
class Changes:
    """What state.db lags behind the files: job ends, and stages that finished."""

    ends: tuple[JobEnd, ...]
    completed: tuple[StageRow, ...]

    def __bool__(self) -> bool:
        return bool(self.ends or self.completed)


@contextmanager
def unsupervised(run: RunDir) -> Iterator[bool]:
    """Yield True while this process holds the run's lock because no supervisor does
    (a non-blocking flock on the supervisor's lock file); False when a supervisor holds
    it, or when the lock cannot be taken at all (e.g. another user's run directory).
    Holding it for the duration keeps a supervisor from starting halfway through."""
    try:
        handle = open(run.lock, "a+")
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: a supervisor holds it
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def supervised(run: RunDir) -> bool:
    """True when a supervisor holds the run's lock right now."""
    if not run.lock.exists():
        return False
    with unsupervised(run) as free:
        return not free


def job_end(run: RunDir, row: JobRow) -> JobEnd | None:
    """How a live row's job ended, from its exit record (preferred: the node agent's own
    code) or its local `.rc` file; None while neither exists."""
    if not row.live or not row.job_id:
        return None
    log = Path(row.log) if row.log else None
    if log is not None and not log.is_absolute():
        log = run.root / log
    sources = [run.exit_record(str(row.job_id))] + ([log.with_name(log.name + ".rc")] if log is not None else [])
    for source in sources:
        found = read_exit_code(source)
        if found is None:
            continue
        code, ended_at = found
        if row.submitted_at is not None and ended_at + CLOCK_SKEW_S < row.submitted_at:
            continue  # left by an earlier job with the same id
        return JobEnd(
            row=row,
            state=end_state(code),
            exit_code=code,
            ended_at=ended_at,
            source=source,
        )
    return None


def find_changes(run: RunDir, store: StateStore) -> Changes:
    """What the files say that state.db does not yet; reads only (any store will do).

    A stage completes when its latest attempt's jobs all ended: the train stage once
    control/DONE exists, a one-shot stage (index, tokenizer, convert, infer) once every
    job COMPLETED.  A server's end is not a completion, and failures stay for the next
    supervisor to decide on."""
    ends = tuple(end for end in (job_end(run, row) for row in store.jobs(live_only=True)) if end is not None)
    final = {end.row.id: end.state for end in ends}
    completed: list[StageRow] = []
    for stage in store.stages():
        if stage.status.ended or stage.kind == "serve":
            continue
        rows = store.jobs(stage.name)
        if not rows:
            continue
        latest = max(row.attempt for row in rows)
        states = [final.get(row.id, row.state) for row in rows if row.attempt == latest]
        if stage.kind == "train":
            done = run.done_flag.exists() and all(state.is_terminal for state in states)
        else:
            done = all(state is JobState.COMPLETED for state in states)
        if done:
            completed.append(stage)
    return Changes(ends=ends, completed=tuple(completed))


def apply_changes(run: RunDir, store: StateStore, changes: Changes) -> list[str]:
    """Write `changes` with an event for each; returns what was changed, one line each."""
    done: list[str] = []
    for end in changes.ends:
        row = end.row
        message = (
            f"{row.stage} {row.role}{row.node_rank} (job {row.job_id}) ended {end.state.value} "
            f"(exit code {end.exit_code}) while no supervisor watched; read from {end.source.name}"
        )
        store.update_job(
            row.id,
            state=end.state,
            exit_code=end.exit_code,
            ended_at=end.ended_at,
            reason=f"exit code {end.exit_code}, from {end.source.name}",
        )
        store.event(
            EVENT,
            message,
            stage=row.stage,
            job=row.id,
            job_id=row.job_id,
            state=end.state.value,
            exit_code=end.exit_code,
            source=str(end.source),
        )
        done.append(message)
    for stage in changes.completed:
        why = "control/DONE exists and every job ended" if stage.kind == "train" else "every job completed"
        message = f"stage {stage.name} completed while no supervisor watched: {why}"
        store.set_stage(stage.name, StageStatus.COMPLETED, detail=f"completed (reconciled: {why})", progress=1.0)
        store.event(EVENT, message, stage=stage.name, previous=stage.status.value)
        done.append(message)
    return done


def reconcile(run: RunDir, store: StateStore, *, holding_lock: bool = False) -> list[str]:
    """Bring `store` (writable) up to date from the run's files; returns what changed.

    Writes nothing while a supervisor holds the run's lock.  A caller that holds the
    lock itself (a supervisor starting on `resume`) passes holding_lock=True: flock
    locks belong to an open file, so probing from the same process would see it held."""
    if holding_lock:
        return apply_changes(run, store, find_changes(run, store))
    if not find_changes(run, store):
        return []  # nothing to write: the lock is not even probed
    with unsupervised(run) as free:
        if not free:
            return []
        # Read again under the lock: a supervisor may have written between the two.
        return apply_changes(run, store, find_changes(run, store))


def reconcile_run(run: RunDir) -> list[str]:
    """For viewers: look read-only first and open state.db for writing only when the
    files are ahead of it, so a refresh that finds nothing to do writes nothing.

    A state.db that cannot be read raises sqlite3.Error (the viewer reports the run as
    unreadable); one that cannot be written (another user's run) is left as it is."""
    if not run.state_db.exists():
        return []
    store = StateStore(run.state_db, readonly=True)
    try:
        if not find_changes(run, store):
            return []
    finally:
        store.close()
    try:
        store = StateStore(run.state_db)
    except (sqlite3.Error, OSError):
        return []
    try:
        with unsupervised(run) as free:
            # Read again under the lock: a supervisor may have written since the look above.
            return apply_changes(run, store, find_changes(run, store)) if free else []
    except sqlite3.OperationalError:  # read-only file or directory: the owner's viewer will do it
        return []
    finally:
        store.close()
