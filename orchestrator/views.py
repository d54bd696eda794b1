"""The one reader of a run directory for the viewers: `status`, the TUI and `plot`.

Each viewer only prints what this module reads: the run catalog, one run as an
immutable `RunView` (stages, jobs, events, the metrics tail, endpoints, and why a part
could not be read), and the JSON-able facts behind `status --json`
(docs/status-schema.md).  It reads files and state.db only, never Slurm; before it reads
state.db it lets `reconcile` write down the job ends the files already show, when no
supervisor watches the run.

A broken run never hides the others: whatever cannot be read becomes a `RunError`
that names the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fm9g.orchestrator import supervisor_state
from fm9g.orchestrator.inproc_recoveries import INPROC_KIND, InprocRecovery, inproc_recoveries
from fm9g.orchestrator.reconcile import job_end, reconcile_run, supervised
from fm9g.orchestrator.state import EventRow, JobRow, StageRow, StateStore
from fm9g.orchestrator.waiting import TRAIN_KIND, spans, waiting_node_seconds
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import read_json

# Events that are not part of the failure timeline: routine or noisy.
QUIET_EVENTS = frozenset({"submitted", "poll_error"})
# The in-process recovery events (kind `inproc`) worth a row of their own in the timeline;
# the rest (every rank's formed, synced, ...) are summed up in its recoveries' rows.
NOTABLE_INPROC = frozenset({"recovery_failed", "fallback", "start_failed", "killed_lost"})
# A writer may commit a row stamped slightly before one we already read; re-reading a
# window of this many seconds (and dropping unchanged rows) never misses it.
UPDATE_OVERLAP_S = 5.0
ETA_WINDOW = 50
# How often a TUI reader looks for job ends that only the files show (reconcile).
RECONCILE_EVERY_S = 5.0
# `status` wants the last step only: the tail of metrics.jsonl is enough.
STATUS_METRICS_BYTES = 65536
UNREADABLE = "UNREADABLE"


# ---------------------------------------------------------------------- errors
@dataclass(frozen=True)
class RunError:
    """A part of a run that cannot be read: which file, what is wrong, what to do."""

    source: str
    message: str
    fix: str

    def short(self) -> str:
        return f"{self.source}: {self.message}"

    def line(self) -> str:
        return f"{self.source}: {self.message}; {self.fix}"

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "message": self.message, "fix": self.fix}


def state_error(run: RunDir, exc: Exception) -> RunError:
    db = run.state_db
    if "locked" in str(exc) or "busy" in str(exc):  # a writer held it past the busy timeout: transient
        return RunError("state.db", f"is busy ({exc})", "try again in a moment; nothing is wrong with the file")
    try:
        empty = db.stat().st_size == 0
    except OSError:
        empty = False
    return RunError(
        "state.db",
        "is empty (0 bytes)" if empty else f"cannot be read ({exc})",
        f"inspect it with `sqlite3 {db} .tables`, or move it aside (`mv {db} {db}.broken`) and run "
        f"`fm9g-launch resume {run.root}`, which re-adopts the run's jobs by their tags",
    )


def config_error(run: RunDir) -> RunError | None:
    """Why config.yaml cannot be used, or None when it loads."""
    from fm9g.rundir.config import load_resolved

    if not run.config.exists():
        return RunError(
            "config.yaml",
            "is missing",
            f"put the run's resolved config back at {run.config}; state.db is still read, but `resume` "
            "cannot restart the run without it",
        )
    try:
        load_resolved(run.config)
    except Exception as exc:  # a viewer never fails on one broken config: say why instead
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return RunError("config.yaml", f"does not load ({first})", f"fix or restore {run.config}")
    return None


# ---------------------------------------------------------------------- the catalog
def is_run(path: Path) -> bool:
    """A run directory has its config or its state database (either may be the one that broke)."""
    return (path / "config.yaml").exists() or (path / "state.db").exists()


def find_runs(root: Path) -> list[RunDir]:
    """Every run directly under `root`, by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((RunDir.of(p) for p in root.iterdir() if p.is_dir() and is_run(p)), key=lambda r: r.name)


def find_run(path: Path) -> RunDir | None:
    """`path` as a run directory, else `./runs/<path>`; None when neither is a run."""
    for candidate in (Path(path), Path("runs") / path):
        if is_run(candidate):
            return RunDir.of(candidate)
    return None


def runs_root_of(target: Path) -> Path:
    """The directory whose runs are listed: a run directory's parent, else the directory itself."""
    target = Path(target).resolve()
    return target.parent if is_run(target) else target


def overall(stages: Sequence[StageRow]) -> str:
    """A run's status from its stages: the worst one wins, COMPLETED when all are done."""
    statuses = [s.status for s in stages]
    if not statuses:
        return "NEW"
    for status in ("FAILED", "CANCELLED", "RUNNING"):
        if status in statuses:
            return status
    if all(s in ("COMPLETED", "SKIPPED") for s in statuses):
        return "COMPLETED"
    return "PENDING"


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    status: str
    error: str = ""


def summarize(run: RunDir) -> RunSummary:
    """A run's name and overall status, for the run list (read-only, cheap)."""
    if not run.state_db.exists():
        return RunSummary(name=run.name, path=run.root, status="NEW")
    try:
        store = StateStore(run.state_db, readonly=True)
        try:
            stages = store.stages()
        finally:
            store.close()
    except (sqlite3.Error, ValueError) as exc:
        return RunSummary(name=run.name, path=run.root, status=UNREADABLE, error=state_error(run, exc).short())
    return RunSummary(name=run.name, path=run.root, status=overall(stages))


def list_runs(root: Path) -> list[RunSummary]:
    """Every run under `root`, by name."""
    return [summarize(run) for run in find_runs(Path(root))]


# ---------------------------------------------------------------------- numbers
def elapsed(started_at: float | None, ended_at: float | None, now: float) -> float | None:
    """Seconds a job or stage has run, as of `now` (a clock passed in, never read here)."""
    if started_at is None:
        return None
    return max(0.0, (ended_at or now) - started_at)


def estimate_eta(samples: Sequence[tuple[int, float]], train_iters: int | None) -> float | None:
    """Seconds left to `train_iters`, from (step, time) samples of recent progress.

    `time` is either a timestamp (the trainer's wall clock) or a per-step duration in
    seconds; values above 1e8 are read as timestamps."""
    if not train_iters or not samples:
        return None
    last_step = samples[-1][0]
    remaining = train_iters - last_step
    if remaining <= 0:
        return 0.0
    times = [t for _, t in samples]
    if times[-1] > 1e8:
        first_step, first_time = samples[0]
        if last_step <= first_step or times[-1] <= first_time:
            return None
        per_step = (times[-1] - first_time) / (last_step - first_step)
    else:
        durations = [t for t in times if t > 0]
        if not durations:
            return None
        # A logged duration is one step's, whatever log_iters is.
        per_step = sum(durations) / len(durations)
    return remaining * per_step


def summary_train_iters(run: RunDir) -> int | None:
    """The planned steps as the trainer wrote them in summary.json, if it did."""
    try:
        summary = read_json(run.summary)
    except (OSError, ValueError):  # being replaced right now: next read
        return None
    value = summary.get("train_iters") if isinstance(summary, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def config_on_node_loss(run: RunDir) -> str:
    """supervise.on_node_loss from config.yaml; 'restart' (the default) when it does not load."""
    from fm9g.rundir.config import load_resolved

    try:
        return load_resolved(run.config).supervise.on_node_loss
    except Exception:  # config_error() says why; the policy's name is all this wants
        return "restart"


def config_train_iters(run: RunDir) -> int | None:
    """The planned steps from config.yaml; None when it is missing or does not load."""
    from fm9g.rundir.config import load_resolved

    try:
        return load_resolved(run.config).train.train_iters
    except Exception:  # config_error() says why; a number is all this wants
        return None


# ---------------------------------------------------------------------- metrics.jsonl
@dataclass(frozen=True)
class MetricPoint:
    """One logged step (model/train.py `_report`: step, loss, lr, grad_norm, tokens_per_s,
    time, and `task_loss` {task: loss} when train.tensorboard_all_tasks is on)."""

    step: int
    loss: float | None
    lr: float | None
    grad_norm: float | None
    tokens_per_s: float | None
    time: float | None
    task_losses: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parse_point(record: Any) -> MetricPoint | None:
    """A MetricPoint from one decoded line, or None when it has no integer step."""
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return None
    tasks = record.get("task_loss")
    task_losses = (
        {str(task): number for task, value in tasks.items() if (number := _number(value)) is not None}
        if isinstance(tasks, dict)
        else {}
    )
    return MetricPoint(
        step=int(step),
        loss=_number(record.get("loss")),
        lr=_number(record.get("lr")),
        grad_norm=_number(record.get("grad_norm")),
        tokens_per_s=_number(record.get("tokens_per_s")),
        time=_number(record.get("time")),
        task_losses=task_losses,
    )


def read_points(path: Path) -> list[MetricPoint]:
    """Every logged step of metrics.jsonl, by step; a step logged twice (a resumed run
    replays the steps after its last checkpoint) keeps its latest value.  Bad and
    partial lines are skipped; OSError when the file cannot be opened."""
    by_step: dict[int, MetricPoint] = {}
    with open(path, "rb") as handle:
        for line in handle:
            try:
                point = parse_point(json.loads(line))
            except ValueError:
                continue
            if point is not None:
                by_step[point.step] = point
    return [by_step[step] for step in sorted(by_step)]


class MetricsTail:
    """Follows one metrics.jsonl: new complete lines only (a partial last line waits for
    its newline), a bounded history for the sparklines and the latest loss of every task.
    Not thread-safe: one poll at a time."""

    def __init__(self, path: Path, history: int = 512, initial_bytes: int = 4 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.initial_bytes = initial_bytes
        self.points: deque[MetricPoint] = deque(maxlen=history)
        self.tasks: dict[str, float] = {}
        self._position = 0
        self._inode: tuple[int, int] | None = None
        self._pending = b""

    def _reset(self) -> None:
        self.points.clear()
        self.tasks.clear()
        self._position = 0
        self._pending = b""

    def poll(self) -> bool:
        """Read new complete lines; True when anything changed."""
        try:
            stat = os.stat(self.path)
        except OSError:
            changed = bool(self.points)
            self._reset()
            self._inode = None
            return changed
        inode = (stat.st_dev, stat.st_ino)
        changed = False
        skip_first = False
        if inode != self._inode or stat.st_size < self._position:
            changed = bool(self.points) or self._inode is not None
            self._reset()
            self._inode = inode
            if stat.st_size > self.initial_bytes:
                self._position = stat.st_size - self.initial_bytes
                skip_first = True
        if stat.st_size == self._position:
            return changed
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._position)
                data = handle.read(stat.st_size - self._position)
        except OSError:
            return changed
        self._position += len(data)
        lines = (self._pending + data).split(b"\n")
        if skip_first:
            lines = lines[1:]  # we started mid-file: the first piece is a line's tail
        self._pending = lines.pop() if lines else b""
        if self._pending:
            # A last line without its newline: take it if it is already a whole JSON object
            # (no proper prefix of an object parses), else wait for the rest.
            try:
                json.loads(self._pending)
            except ValueError:
                pass
            else:
                lines.append(self._pending)
                self._pending = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                point = parse_point(json.loads(line))
            except ValueError:
                continue
            if point is None:
                continue
            self.points.append(point)
            self.tasks.update(point.task_losses)
            changed = True
        return changed

    @property
    def last(self) -> MetricPoint | None:
        return self.points[-1] if self.points else None


# ---------------------------------------------------------------------- one run
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
    """Everything a viewer shows about one run at one instant (`now`)."""

    run: RunDir
    now: float
    status: str = "NEW"
    owner: str | None = None
    executor: str | None = None
    supervisor_job: str | None = None  # the run's supervisor Slurm job (supervise.where: job)
    supervisor: supervisor_state.SupervisorJob | None = None  # the newest one and its phase
    waiting_node_s: float | None = None  # the training stage's (orchestrator/waiting.py)
    stages: tuple[StageRow, ...] = ()
    jobs: tuple[JobRow, ...] = ()  # stage order, then attempt, node rank
    changed: frozenset[int] = frozenset()  # job row ids new or changed since the previous view
    events: tuple[EventRow, ...] = ()  # the failure timeline's events that are new since the previous view
    inproc_recoveries: tuple[InprocRecovery, ...] = ()  # every in-process recovery so far (wait/shrink)
    metrics: MetricsView = MetricsView()
    endpoint: dict[str, Any] | None = None
    serve: dict[str, Any] | None = None
    done: bool = False
    reconciled: tuple[str, ...] = ()  # what this load wrote down from the files (reconcile)
    error: RunError | None = None  # state.db first, then config.yaml


def _notable_inproc(event: EventRow) -> bool:
    """Whether an event belongs in the timeline: all but the routine `inproc` ones."""
    return event.kind != INPROC_KIND or event.data.get("event") in NOTABLE_INPROC


def _read_small_json(path: Path) -> dict[str, Any] | None:
    try:
        value = read_json(path)
    except (OSError, ValueError):  # written atomically, so only a foreign file gets here
        return None
    return value if isinstance(value, dict) else None


class RunReader:
    """Reads one run into RunViews, incrementally: each `load()` reads the stages, only
    the job rows updated since the last load, only the new events, and only the new
    lines of metrics.jsonl, so a tick costs what changed, not the size of the run.

    Each load opens state.db anew, read-only: a sqlite connection belongs to the thread
    that made it, and every TUI refresh runs in a fresh worker thread."""

    def __init__(
        self, run: RunDir, clock: Callable[[], float], *, reconcile: bool = True, metrics_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self.run = run
        self.clock = clock
        self.reconcile = reconcile
        self.metrics = MetricsTail(run.metrics, initial_bytes=metrics_bytes)
        self._jobs: dict[int, JobRow] = {}
        self._stages: list[StageRow] | None = None
        self._meta: dict[str, Any] = {}
        self._since: float | None = None
        self._last_event = 0
        self._order: list[int] = []
        self._order_stages: tuple[str, ...] = ()
        self._config_read = False
        self._config_iters: int | None = None
        self._config_error: RunError | None = None
        self._reconciled_at: float | None = None
        self._supervisor: supervisor_state.SupervisorJob | None = None
        self._inproc: list[dict[str, Any]] = []  # every `inproc` event's record, as read
        self._on_node_loss = "restart"

    def _reconcile(self) -> list[str]:
        """Let reconcile write down what the files show, at most every RECONCILE_EVERY_S.
        The first load asks reconcile itself; later loads first look at the live rows they
        already hold (two stats a job), so a tick costs no extra query when nothing ended."""
        if not self.reconcile:
            return []
        now = time.monotonic()
        if self._reconciled_at is not None and now - self._reconciled_at < RECONCILE_EVERY_S:
            return []
        self._reconciled_at = now
        if self._stages is not None:
            ended = any(job_end(self.run, job) is not None for job in self._jobs.values() if job.live)
            finished = self.run.done_flag.exists() and any(
                s.kind == "train" and not s.status.ended for s in self._stages
            )
            if not (ended or finished):
                return []
        return reconcile_run(self.run)

    def _read_config(self) -> None:
        """config.yaml once: a run's resolved config does not change under it."""
        if not self._config_read:
            self._config_read = True
            self._config_error = config_error(self.run)
            self._config_iters = None if self._config_error else config_train_iters(self.run)
            self._on_node_loss = "restart" if self._config_error else config_on_node_loss(self.run)

    def train_iters(self) -> int | None:
        """From summary.json when the trainer wrote one, else from config.yaml."""
        self._read_config()
        found = summary_train_iters(self.run)
        return found if found is not None else self._config_iters

    def _read_state(self, store: StateStore) -> tuple[set[int], list[EventRow]]:
        self._meta = {key: store.meta(key) for key in ("owner", "executor", "supervisor_job", "nodes")}
        stages = store.stages()
        since = None if self._since is None else self._since - UPDATE_OVERLAP_S
        changed: set[int] = set()
        for job in store.jobs_updated_since(since):
            if self._jobs.get(job.id) != job:
                self._jobs[job.id] = job
                changed.add(job.id)
            if job.updated_at is not None and (self._since is None or job.updated_at > self._since):
                self._since = job.updated_at
        if self._since is None:
            self._since = 0.0
        new_events = store.events(since_id=self._last_event)
        self._supervisor = supervisor_state.follow(new_events, self._supervisor)
        self._inproc.extend(e.data for e in new_events if e.kind == INPROC_KIND)
        events = [e for e in new_events if e.kind not in QUIET_EVENTS and _notable_inproc(e)]
        self._last_event = max(self._last_event, store.max_event_id())
        self._stages = stages
        return changed, events

    def load(self) -> RunView:
        """Read what changed since the last load."""
        now = self.clock()
        self._read_config()
        changed: set[int] = set()
        events: list[EventRow] = []
        reconciled: list[str] = []
        error: RunError | None = None
        if self.run.state_db.exists():
            try:
                reconciled = self._reconcile()
                store = StateStore(self.run.state_db, readonly=True)
                try:
                    changed, events = self._read_state(store)
                finally:
                    store.close()
            except (
                sqlite3.Error,
                ValueError,
            ) as exc:  # locked, half-written or not a database: keep the last view, say why
                error = state_error(self.run, exc)
        stages = self._stages or []
        stage_names = tuple(stage.name for stage in stages)
        if len(self._order) != len(self._jobs) or stage_names != self._order_stages:
            # Re-sort only when jobs or stages appear; a changed row keeps its place.
            rank = {name: index for index, name in enumerate(stage_names)}
            self._order = sorted(
                self._jobs,
                key=lambda i: (
                    rank.get(self._jobs[i].stage, len(rank)),
                    self._jobs[i].stage,
                    self._jobs[i].attempt,
                    self._jobs[i].node_rank,
                    i,
                ),
            )
            self._order_stages = stage_names
        status = UNREADABLE if error is not None and self._stages is None else overall(stages)
        self.metrics.poll()
        return RunView(
            run=self.run,
            now=now,
            status=status,
            owner=self._meta.get("owner"),
            executor=self._meta.get("executor"),
            supervisor_job=self._meta.get("supervisor_job"),
            supervisor=self._supervisor_view(),
            waiting_node_s=self._waiting(stages, now),
            stages=tuple(stages),
            jobs=tuple(self._jobs[i] for i in self._order),
            changed=frozenset(changed),
            events=tuple(events),
            inproc_recoveries=tuple(inproc_recoveries(self._inproc, self._on_node_loss)),
            metrics=self._metrics_view(),
            endpoint=_read_small_json(self.run.endpoint),
            serve=_read_small_json(self.run.serve_endpoint),
            done=self.run.done_flag.exists(),
            reconciled=tuple(reconciled),
            error=error or self._config_error,
        )

    def _supervisor_view(self) -> supervisor_state.SupervisorJob | None:
        """The newest supervisor job; a started one is probed against the run's lock."""
        job = self._supervisor
        if job is None or job.phase is not supervisor_state.SupervisorPhase.RUNNING:
            return job
        return supervisor_state.with_lock(job, supervised(self.run))

    def _waiting(self, stages: Sequence[StageRow], now: float) -> float | None:
        """The training stage's waiting node-seconds; None before it has a job."""
        nodes = self._meta.get("nodes")
        train = {stage.name for stage in stages if stage.kind == TRAIN_KIND}
        rows = [job for job in self._jobs.values() if job.stage in train]
        if not isinstance(nodes, int) or not rows:
            return None
        return waiting_node_seconds(spans(rows), nodes, now)

    def _metrics_view(self) -> MetricsView:
        points = list(self.metrics.points)
        train_iters = self.train_iters()
        if not points:
            return MetricsView(train_iters=train_iters)
        recent = [(p.step, p.time) for p in points[-ETA_WINDOW:] if p.time is not None]
        return MetricsView(
            last=points[-1],
            losses=tuple(p.loss for p in points if p.loss is not None),
            lrs=tuple(p.lr for p in points if p.lr is not None),
            tasks=dict(self.metrics.tasks),
            train_iters=train_iters,
            eta_s=estimate_eta(recent, train_iters),
        )


# ---------------------------------------------------------------------- status --json
def collect(run: RunDir, now: float | None = None) -> dict[str, Any]:
    """Everything `status` shows about one run, as plain JSON-able data; its shape is the
    stable schema of docs/status-schema.md."""
    view = RunReader(run, time.time, metrics_bytes=STATUS_METRICS_BYTES).load()
    now = view.now if now is None else now
    last = view.metrics.last
    progress = (
        None
        if last is None
        else {
            "step": last.step,
            "loss": last.loss,
            "lr": last.lr,
            "tokens_per_s": last.tokens_per_s,
            "time": last.time,
            "train_iters": view.metrics.train_iters,
        }
    )
    return {
        "name": run.name,
        "path": str(run.root),
        "status": view.status,
        "owner": view.owner,
        "executor": view.executor,
        "supervisor_job": view.supervisor_job,
        "supervisor_state": view.supervisor.phase.value if view.supervisor else None,
        "waiting_node_seconds": view.waiting_node_s,
        "stages": [
            {
                "name": s.name,
                "kind": s.kind,
                "status": s.status.value,
                "detail": s.detail,
                "progress": s.progress,
                "started_at": s.started_at,
                "ended_at": s.ended_at,
            }
            for s in view.stages
        ],
        "jobs": [
            {
                "id": j.id,
                "stage": j.stage,
                "role": j.role,
                "node_rank": j.node_rank,
                "attempt": j.attempt,
                "generation": j.generation,
                "job_id": j.job_id,
                "state": j.state.value,
                "reason": j.reason,
                "node": j.node,
                "exit_code": j.exit_code,
                "restarts": j.restarts,
                "elapsed": elapsed(j.started_at, j.ended_at, now),
                "log": j.log,
                "submitted_at": j.submitted_at,
            }
            for j in sorted(view.jobs, key=lambda j: j.id)
        ],
        "progress": progress,
        "endpoint": view.endpoint,
        "serve": view.serve,
        "done": view.done,
        "recoveries": [
            {"node_rank": e.data.get("node_rank"), "phases": e.data.get("phases", {}), "message": e.message}
            for e in view.events
            if e.kind == "recovery"
        ],
        "inproc_recoveries": [recovery.to_json() for recovery in view.inproc_recoveries],
        "error": view.error.to_json() if view.error else None,
    }
