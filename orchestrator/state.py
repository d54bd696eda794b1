"""`StateStore`: the run's SQLite database (WAL) of stages, jobs (one row per submission
attempt) and events.  The supervisor writes it; the CLI and the TUI only read it.

A job row is inserted with its intent (stage, role, node, attempt, script hash) and
state 'SUBMITTING' *before* sbatch is called, and gets its job id after; a crash in
between leaves a row that `resume` resolves by the job's --comment tag, so a crash can
never cause a second submission of the same attempt.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm9g.orchestrator.slurm.states import TERMINAL_STATES, JobState

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,            -- PENDING RUNNING COMPLETED FAILED SKIPPED CANCELLED
    depends_on TEXT NOT NULL DEFAULT '[]',
    detail TEXT NOT NULL DEFAULT '',
    progress REAL,
    started_at REAL, ended_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage TEXT NOT NULL,
    role TEXT NOT NULL,              -- master worker index convert infer serve
    node_rank INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    tag TEXT NOT NULL,               -- the --comment; matches a job back after a crash
    script TEXT NOT NULL,
    script_hash TEXT NOT NULL,
    job_id TEXT,                     -- executor id (Slurm job id or local pid); NULL until submitted
    state TEXT NOT NULL,             -- SUBMITTING, then a JobState name
    reason TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0,
    log TEXT NOT NULL DEFAULT '',
    submitted_at REAL, started_at REAL, ended_at REAL, updated_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_stage ON jobs(stage);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    job INTEGER,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
"""

__all__ = ["TERMINAL_STATES", "EventRow", "JobRow", "JobState", "StageRow", "StageStatus", "StateStore"]


class StageStatus(str, enum.Enum):
    """Where a stage stands; a stage row's `status` column holds the value."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"

    @property
    def ended(self) -> bool:
        return self in (StageStatus.COMPLETED, StageStatus.FAILED, StageStatus.SKIPPED, StageStatus.CANCELLED)


@dataclass(frozen=True)
class JobRow:
    id: int
    stage: str
    role: str
    node_rank: int
    attempt: int
    generation: int
    tag: str
    script: str
    script_hash: str
    job_id: str | None
    state: JobState
    reason: str
    node: str
    exit_code: int | None
    restarts: int
    log: str
    submitted_at: float | None
    started_at: float | None
    ended_at: float | None
    updated_at: float | None

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL_STATES


@dataclass(frozen=True)
class StageRow:
    name: str
    kind: str
    status: StageStatus
    depends_on: list[str]
    detail: str
    progress: float | None
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True)
class EventRow:
    id: int
    time: float
    kind: str
    stage: str
    job: int | None
    message: str
    data: dict[str, Any]


class StateStore:
    """A connection to one run's state.db; cheap to open, safe across processes (WAL)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    # ------------------------------------------------------------------ stages
    def upsert_stage(self, name: str, kind: str, depends_on: list[str] | None = None) -> None:
        self.db.execute(
            "INSERT INTO stages(name, kind, status, depends_on) VALUES(?, ?, 'PENDING', ?) "
            "ON CONFLICT(name) DO NOTHING",
            (name, kind, json.dumps(depends_on or [])),
        )

    def set_stage(
        self, name: str, status: StageStatus | str, detail: str | None = None, progress: float | None = None
    ) -> None:
        now = time.time()
        status = StageStatus(status)
        sets = ["status=?"]
        values: list[Any] = [status.value]
        if detail is not None:
            sets.append("detail=?")
            values.append(detail)
        if progress is not None:
            sets.append("progress=?")
            values.append(progress)
        if status is StageStatus.RUNNING:
            sets.append("started_at=COALESCE(started_at, ?)")
            values.append(now)
            sets.append("ended_at=NULL")
        elif status.ended:
            sets.append("ended_at=?")
            values.append(now)
        self.db.execute(f"UPDATE stages SET {', '.join(sets)} WHERE name=?", (*values, name))

    def set_stage_progress(self, name: str, progress: float, detail: str | None = None) -> None:
        if detail is None:
            self.db.execute("UPDATE stages SET progress=? WHERE name=?", (progress, name))
        else:
            self.db.execute("UPDATE stages SET progress=?, detail=? WHERE name=?", (progress, detail, name))

    def stages(self) -> list[StageRow]:
        rows = self.db.execute("SELECT * FROM stages ORDER BY rowid").fetchall()
        return [
            StageRow(
                name=r["name"],
                kind=r["kind"],
                status=StageStatus(r["status"]),
                depends_on=json.loads(r["depends_on"]),
                detail=r["detail"],
                progress=r["progress"],
                started_at=r["started_at"],
                ended_at=r["ended_at"],
            )
            for r in rows
        ]

    def stage(self, name: str) -> StageRow | None:
        return next((s for s in self.stages() if s.name == name), None)

    # ------------------------------------------------------------------ jobs
    def record_intent(
        self,
        *,
        stage: str,
        role: str,
        node_rank: int,
        attempt: int,
        generation: int,
        tag: str,
        script: str,
        script_hash: str,
        log: str,
    ) -> int:
        """Insert a job row before submitting it; returns the row id."""
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO jobs(stage, role, node_rank, attempt, generation, tag, script, script_hash, state, log, updated_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, 'SUBMITTING', ?, ?)",
            (stage, role, node_rank, attempt, generation, tag, script, script_hash, log, now),
        )
        return int(cursor.lastrowid)

    def mark_submitted(self, row_id: int, job_id: str, log: str | None = None) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE jobs SET job_id=?, state='PENDING', submitted_at=?, updated_at=?, log=COALESCE(?, log) WHERE id=?",
            (job_id, now, now, log, row_id),
        )

    def update_job(self, row_id: int, **fields: Any) -> None:
        if not fields:
            return
        if isinstance(fields.get("state"), JobState):
            fields["state"] = fields["state"].value
        fields["updated_at"] = time.time()
        names = ", ".join(f"{key}=?" for key in fields)
        self.db.execute(f"UPDATE jobs SET {names} WHERE id=?", (*fields.values(), row_id))

    def jobs(self, stage: str | None = None, live_only: bool = False) -> list[JobRow]:
        query = "SELECT * FROM jobs"
        clauses, values = [], []
        if stage is not None:
            clauses.append("stage=?")
            values.append(stage)
        if live_only:
            clauses.append(f"state NOT IN ({','.join('?' * len(TERMINAL_STATES))})")
            values.extend(sorted(state.value for state in TERMINAL_STATES))
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        rows = self.db.execute(query + " ORDER BY id", values).fetchall()
        return [_job_row(r) for r in rows]

    def job(self, row_id: int) -> JobRow | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (row_id,)).fetchone()
        return _job_row(row) if row else None

    # ------------------------------------------------------------------ events
    def event(self, kind: str, message: str, *, stage: str = "", job: int | None = None, **data: Any) -> None:
        self.db.execute(
            "INSERT INTO events(time, kind, stage, job, message, data) VALUES(?, ?, ?, ?, ?, ?)",
            (time.time(), kind, stage, job, message, json.dumps(data, default=str)),
        )

    def events(self, kind: str | None = None, since_id: int = 0) -> list[EventRow]:
        query, values = "SELECT * FROM events WHERE id>?", [since_id]
        if kind is not None:
            query += " AND kind=?"
            values.append(kind)
        rows = self.db.execute(query + " ORDER BY id", values).fetchall()
        return [
            EventRow(
                id=r["id"],
                time=r["time"],
                kind=r["kind"],
                stage=r["stage"],
                job=r["job"],
                message=r["message"],
                data=json.loads(r["data"]),
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ for viewers
    def jobs_updated_since(self, since: float | None) -> list[JobRow]:
        """Job rows written at or after `since` (every row when None), so a viewer that
        refreshes every second reads what changed, not the whole history."""
        if since is None:
            return self.jobs()
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE updated_at >= ? OR updated_at IS NULL ORDER BY id", (since,)
        ).fetchall()
        return [_job_row(r) for r in rows]

    def max_event_id(self) -> int:
        """The newest event's id (0 when there is none): where a viewer's next
        `events(since_id=...)` starts."""
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])


def _job_row(record: sqlite3.Row) -> JobRow:
    values = dict(record)
    values["state"] = JobState.parse(values["state"])
    return JobRow(**values)
