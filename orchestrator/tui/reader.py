"""`RunReader`: one run directory read into an immutable `RunView`, incrementally.

Each `load()` opens the state DB read-only (a sqlite connection belongs to the thread
that made it, and every refresh runs in a fresh worker thread), reads the stages,
only the job rows updated since the last load and only the new events, and the new
lines of metrics.jsonl.  The cost of a tick therefore follows what changed, not the
size of the run."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fm9g.rundir.atomic import read_json
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import TERMINAL_STATES, EventRow, JobRow, StageRow, StateStore
from fm9g.orchestrator.status import overall
from fm9g.orchestrator.tui.format import estimate_eta
from fm9g.orchestrator.tui.metrics import MetricPoint, MetricsTail

# Events that are not part of the failure timeline: routine or noisy.
QUIET_EVENTS = frozenset({"submitted", "poll_error"})
# A writer may commit a row stamped slightly before one we already read; re-reading a
# window of this many seconds (and dropping unchanged rows) never misses it.
UPDATE_OVERLAP_S = 5.0
ETA_WINDOW = 50


@dataclass(frozen=True, eq=False)
class MetricsView:
    last: MetricPoint | None = None
    losses: tuple[float, ...] = ()
    lrs: tuple[float, ...] = ()
    tasks: dict[str, float] = field(default_factory=dict)
    train_iters: int | None = None
    eta_s: float | None = None


@dataclass(frozen=True, eq=False)
class RunView:
    """Everything the screen shows about one run at one instant (`now`)."""

    run: RunDir
    now: float
    status: str = "NEW"
    owner: str | None = None
    executor: str | None = None
    stages: tuple[StageRow, ...] = ()
    jobs: tuple[JobRow, ...] = ()          # stage order, then attempt, node rank
    changed: frozenset[int] = frozenset()  # job row ids new or changed since the previous view
    events: tuple[EventRow, ...] = ()      # the failure timeline's events that are new since the previous view
    metrics: MetricsView = MetricsView()
    error: str = ""


def _row(row: sqlite3.Row) -> JobRow:
    return JobRow(**dict(row))


class RunReader:
    """Reads one run; `load()` is called from one refresh worker at a time."""

    def __init__(self, run: RunDir, clock: Callable[[], float]) -> None:
        self.run = run
        self.clock = clock
        self.metrics = MetricsTail(run.metrics)
        self._jobs: dict[int, JobRow] = {}
        self._since: float | None = None
        self._last_event = 0
        self._order: list[int] = []
        self._order_stages: tuple[str, ...] = ()
        self._train_iters: int | None = None
        self._train_iters_read = False

    def train_iters(self) -> int | None:
        """From summary.json when the trainer wrote one, else from config.yaml (read once)."""
        try:
            summary = read_json(self.run.summary) or {}
        except (OSError, ValueError):  # being replaced right now: next tick
            summary = {}
        if isinstance(summary, dict) and isinstance(summary.get("train_iters"), int):
            return summary["train_iters"]
        if not self._train_iters_read:
            self._train_iters_read = True
            try:
                from fm9g.rundir.config import load_resolved
                self._train_iters = load_resolved(self.run.config).train.train_iters
            except Exception:  # a viewer never fails on one broken config
                self._train_iters = None
        return self._train_iters

    def _read_state(self, store: StateStore) -> tuple[dict[str, Any], list[StageRow], set[int], list[EventRow]]:
        meta = {key: store.meta(key) for key in ("owner", "executor")}
        stages = store.stages()
        if self._since is None:
            rows = store.db.execute("SELECT * FROM jobs").fetchall()
        else:
            rows = store.db.execute("SELECT * FROM jobs WHERE updated_at >= ? OR updated_at IS NULL",
                                    (self._since - UPDATE_OVERLAP_S,)).fetchall()
        changed: set[int] = set()
        for raw in rows:
            job = _row(raw)
            if self._jobs.get(job.id) != job:
                self._jobs[job.id] = job
                changed.add(job.id)
            if job.updated_at is not None and (self._since is None or job.updated_at > self._since):
                self._since = job.updated_at
        if self._since is None:
            self._since = 0.0
        events = [e for e in store.events(since_id=self._last_event) if e.kind not in QUIET_EVENTS]
        last = store.db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        self._last_event = max(self._last_event, last or 0)
        return meta, stages, changed, events

    def load(self) -> RunView:
        """Read what changed since the last load."""
        now = self.clock()
        meta: dict[str, Any] = {}
        stages: list[StageRow] = []
        changed: set[int] = set()
        events: list[EventRow] = []
        error = ""
        if self.run.state_db.exists():
            try:
                store = StateStore(self.run.state_db, readonly=True)
                try:
                    meta, stages, changed, events = self._read_state(store)
                finally:
                    store.close()
            except sqlite3.Error as exc:  # locked or half-written: show the last view, say why
                error = f"state.db: {exc}"
        stage_names = tuple(stage.name for stage in stages)
        if len(self._order) != len(self._jobs) or stage_names != self._order_stages:
            # Re-sort only when jobs or stages appear; a changed row keeps its place.
            rank = {name: index for index, name in enumerate(stage_names)}
            self._order = sorted(self._jobs, key=lambda i: (rank.get(self._jobs[i].stage, len(rank)), self._jobs[i].stage,
                                                            self._jobs[i].attempt, self._jobs[i].node_rank, i))
            self._order_stages = stage_names
        jobs = [self._jobs[i] for i in self._order]
        self.metrics.poll()
        return RunView(run=self.run, now=now, status=overall(stages) if stages else "NEW",
                       owner=meta.get("owner"), executor=meta.get("executor"), stages=tuple(stages),
                       jobs=tuple(jobs), changed=frozenset(changed), events=tuple(events),
                       metrics=self._metrics_view(), error=error)

    def _metrics_view(self) -> MetricsView:
        points = list(self.metrics.points)
        if not points:
            return MetricsView(train_iters=self.train_iters())
        train_iters = self.train_iters()
        recent = [(p.step, p.time) for p in points[-ETA_WINDOW:] if p.time is not None]
        return MetricsView(last=points[-1], losses=tuple(p.loss for p in points if p.loss is not None),
                           lrs=tuple(p.lr for p in points if p.lr is not None), tasks=dict(self.metrics.tasks),
                           train_iters=train_iters, eta_s=estimate_eta(recent, train_iters))


def is_live(job: JobRow) -> bool:
    return job.state not in TERMINAL_STATES
