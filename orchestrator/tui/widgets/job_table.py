"""`JobTable`: a run's stages, each followed by its jobs grouped by attempt, one row
per node job (job id, node, Slurm state and reason, restarts, generation, elapsed).

Updates are incremental: rows are rebuilt only when the set or order of rows changes
(a submission, a new filter); otherwise only the cells of changed or live jobs are
recomputed and only the cells that differ are written."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.text import Text
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import DataTable

from fm9g.orchestrator.state import TERMINAL_STATES, JobRow, StageRow
from fm9g.orchestrator.tui.format import format_elapsed, format_state, job_label, state_style
from fm9g.orchestrator.views import RunView, elapsed

# (key, header, width): fixed widths keep the table inside 80 columns and spare the
# per-update width measurement; the state column (with the pending reason) takes
# whatever a wider terminal adds, up to STATE_MAX.
COLUMNS = (
    ("job", "job", 14),
    ("id", "job id", 8),
    ("node", "node", 8),
    ("state", "state", 18),
    ("restarts", "rst", 3),
    ("generation", "gen", 3),
    ("elapsed", "elapsed", 7),
)
STATE_MIN, STATE_MAX = 18, 44
assert COLUMNS[-1][0] == "elapsed"  # sync() rewrites the last cell alone for live jobs
Cells = tuple[str | Text, ...]


@dataclass(frozen=True)
class Line:
    """One table row: a stage header or a job, with how it sits in its attempt group."""

    key: str
    stage: StageRow | None = None
    job: JobRow | None = None
    first_of_attempt: bool = False
    superseded: bool = False


def matches(job: JobRow, needle: str) -> bool:
    """Whether a job row matches the filter text (case-insensitive substring of its facts)."""
    haystack = " ".join(
        (
            job.stage,
            job.role,
            f"r{job.node_rank}",
            f"a{job.attempt}",
            f"g{job.generation}",
            job.job_id or "",
            job.node,
            job.state,
            job.reason,
        )
    ).lower()
    return all(word in haystack for word in needle.lower().split())


def state_width(table_width: int) -> int:
    """The state column's width in a table `table_width` cells wide (padding and scrollbar counted)."""
    fixed = sum(width for key, _, width in COLUMNS if key != "state") + 2 * len(COLUMNS) + 2
    return max(STATE_MIN, min(STATE_MAX, table_width - fixed))


class JobTable(DataTable[str | Text]):
    DEFAULT_CSS = """
    JobTable { height: 1fr; }
    """

    class JobHighlighted(Message):
        """The cursor moved to a job (job set) or a stage header (job None)."""

        def __init__(self, job: JobRow | None, stage: str | None) -> None:
            self.job = job
            self.stage = stage
            super().__init__()

    view: reactive[RunView | None] = reactive(None, always_update=True)
    filter_text: reactive[str] = reactive("")

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self._keys: list[str] = []
        self._lines: dict[str, Line] = {}
        self._cells: dict[str, Cells] = {}
        self._state_width = STATE_MIN
        self._stage_names: tuple[str, ...] = ()
        self._job_count = -1
        self._seconds: dict[str, int] = {}

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, header, width in COLUMNS:
            self.add_column(header, key=key, width=self._state_width if key == "state" else width)

    def on_resize(self, event: events.Resize) -> None:
        width = state_width(event.size.width)
        if width != self._state_width:
            self._state_width = width
            self.clear(columns=True)
            self._add_columns()
            self.sync(rebuild=True)

    # ----------------------------------------------------------------- layout
    def layout_lines(self, view: RunView) -> list[Line]:
        """The rows to show, in order, after the filter."""
        needle = self.filter_text.strip()
        newest: dict[tuple[str, int], int] = {}
        for job in view.jobs:
            key = (job.stage, job.node_rank)
            newest[key] = max(newest.get(key, 0), job.attempt)
        by_stage: dict[str, list[JobRow]] = {}
        for job in view.jobs:
            if not needle or matches(job, needle):
                by_stage.setdefault(job.stage, []).append(job)
        lines: list[Line] = []
        stages = list(view.stages) + [
            StageRow(name, "?", "UNKNOWN", [], "", None, None, None)
            for name in by_stage
            if name not in {s.name for s in view.stages}
        ]
        for stage in stages:
            jobs = by_stage.get(stage.name, [])
            if needle and not jobs and needle.lower() not in stage.name.lower():
                continue
            lines.append(Line(key=f"stage:{stage.name}", stage=stage))
            previous_attempt = None
            for job in jobs:
                lines.append(
                    Line(
                        key=f"job:{job.id}",
                        job=job,
                        first_of_attempt=job.attempt != previous_attempt,
                        superseded=job.attempt < newest[(job.stage, job.node_rank)],
                    )
                )
                previous_attempt = job.attempt
        return lines

    def cells(self, line: Line, now: float) -> Cells:
        """The cell values of one row as of `now`."""
        if line.stage is not None:
            stage = line.stage
            state = stage.status + (
                f" {100 * stage.progress:.0f}%" if stage.progress is not None and stage.status == "RUNNING" else ""
            )
            return (
                Text(stage.name, style="bold"),
                "",
                "",
                Text(state, style=state_style(stage.status)),
                "",
                "",
                format_elapsed(elapsed(stage.started_at, stage.ended_at, now)),
            )
        job = line.job
        assert job is not None
        dim = "dim" if line.superseded else ""
        return (
            Text(job_label(job.attempt, job.node_rank, job.role, line.first_of_attempt), style=dim),
            job.job_id or "-",
            job.node or "-",
            Text(format_state(job.state, job.reason, job.exit_code), style=dim or state_style(job.state)),
            str(job.restarts),
            str(job.generation),
            format_elapsed(elapsed(job.started_at, job.ended_at, now)),
        )

    # ----------------------------------------------------------------- updates
    def watch_view(self, view: RunView | None) -> None:
        self.sync(rebuild=False)

    def watch_filter_text(self, text: str) -> None:
        self.sync(rebuild=True)

    def sync(self, rebuild: bool) -> None:
        """Bring the table to `self.view`, writing only what changed."""
        view = self.view
        if view is None or not self.columns:
            self.clear()
            self._keys, self._lines, self._cells = [], {}, {}
            return
        changed = view.changed
        stage_names = tuple(stage.name for stage in view.stages)
        # The rows can only move when jobs or stages appear, or, under a filter, when a
        # changed job may start or stop matching; otherwise the layout is kept as it is.
        if (
            rebuild
            or stage_names != self._stage_names
            or len(view.jobs) != self._job_count
            or (changed and self.filter_text.strip())
        ):
            self._stage_names, self._job_count = stage_names, len(view.jobs)
            lines = self.layout_lines(view)
            if rebuild or [line.key for line in lines] != self._keys:
                self._rebuild(lines, view.now)
                return
            self._lines = {line.key: line for line in lines}
        else:
            if changed:
                for job in view.jobs:
                    if job.id in changed and f"job:{job.id}" in self._lines:
                        self._lines[f"job:{job.id}"] = replace(self._lines[f"job:{job.id}"], job=job)
            for stage in view.stages:
                key = f"stage:{stage.name}"
                if key in self._lines:
                    self._lines[key] = replace(self._lines[key], stage=stage)
        for key, line in self._lines.items():
            job = line.job
            if job is None or job.id in changed:
                self._write(key, self.cells(line, view.now))
            elif job.state not in TERMINAL_STATES and job.started_at is not None:
                # An unchanged live job: only its elapsed time moves, once a second.
                seconds = max(0, int(view.now - job.started_at))
                if seconds != self._seconds.get(key):
                    self._seconds[key] = seconds
                    self._write(key, self._cells[key][:-1] + (format_elapsed(seconds),))
        self._post_highlight()

    def _write(self, key: str, cells: Cells) -> None:
        old = self._cells[key]
        if cells == old:
            return
        self._cells[key] = cells
        for (column, _, _), new, before in zip(COLUMNS, cells, old):
            if new != before:
                self.update_cell(key, column, new)

    def _rebuild(self, lines: list[Line], now: float) -> None:
        current = self._current_key()
        self.clear()
        self._keys = [line.key for line in lines]
        self._lines = {line.key: line for line in lines}
        self._cells = {line.key: self.cells(line, now) for line in lines}
        self._seconds = {}
        for line in lines:
            self.add_row(*self._cells[line.key], key=line.key)
        if current in self._lines:
            self.move_cursor(row=self._keys.index(current), animate=False)
        self._post_highlight()

    # ----------------------------------------------------------------- cursor
    def _current_key(self) -> str | None:
        if not self._keys or not (0 <= self.cursor_row < len(self._keys)):
            return None
        return self._keys[self.cursor_row]

    def current_line(self) -> Line | None:
        key = self._current_key()
        return self._lines.get(key) if key else None

    def _post_highlight(self) -> None:
        line = self.current_line()
        if line is None:
            self.post_message(self.JobHighlighted(None, None))
        elif line.job is not None:
            self.post_message(self.JobHighlighted(line.job, line.job.stage))
        else:
            assert line.stage is not None
            self.post_message(self.JobHighlighted(None, line.stage.name))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._post_highlight()
