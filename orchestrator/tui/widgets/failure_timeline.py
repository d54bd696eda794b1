"""`FailureTimeline`: the run's failures and what followed them (recovery phases
detected → resubmitted → allocated → rendezvous → first step, full restarts, hangs,
Slurm requeues, cancels), oldest first.  Events only ever append.

In-process recoveries (supervise.on_node_loss wait/shrink) are one row each, added when
the loss is detected and rewritten in place as the recovery reaches its later phases
(re-formed → state synced → first step)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from rich.text import Text
from textual import events
from textual.widgets import DataTable

from fm9g.orchestrator.inproc_recoveries import InprocRecovery
from fm9g.orchestrator.state import EventRow, JobRow
from fm9g.orchestrator.tui.format import format_clock, format_inproc, format_phases

KIND_STYLES = {
    "failure": "red",
    "recovery": "green",
    "full_restart": "bold red",
    "hang": "red",
    "requeued_by_slurm": "yellow",
    "cancel": "magenta",
    "stage_end": "blue",
    "inproc": "yellow",  # recovery_failed, fallback, start_failed, killed_lost (a recovery row: INPROC_STYLES)
}
INPROC_STYLES = {"fast": "green", "fallback": "red"}
MAX_ROWS = 1000
# (key, header, width); the last column takes the rest of the pane's width.
COLUMNS = (("time", "time", 8), ("kind", "event", 10), ("node", "node", 4), ("what", "what", 0))
WHAT_MIN = 12

Cells = tuple[str | Text, ...]


class FailureTimeline(DataTable[Text | str]):
    DEFAULT_CSS = """
    FailureTimeline { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="none", show_cursor=False, **kwargs)  # type: ignore[arg-type]
        self._rows: deque[tuple[str, Cells]] = deque(maxlen=MAX_ROWS)
        self._last_id = 0
        self._what_width = WHAT_MIN
        self._inproc: dict[str, Cells] = {}  # row key -> cells of each in-process recovery shown

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, header, width in COLUMNS:
            self.add_column(header, key=key, width=width or self._what_width)

    def on_resize(self, event: events.Resize) -> None:
        fixed = sum(width for *_, width in COLUMNS) + 2 * len(COLUMNS) + 2  # cell padding, scrollbar
        width = max(WHAT_MIN, event.size.width - fixed)
        if width != self._what_width:
            self._what_width = width
            self.clear(columns=True)
            self._add_columns()
            for key, cells in self._rows:
                self.add_row(*cells, key=key, height=None)
            self.scroll_end(animate=False)

    def reset(self) -> None:
        self.clear()
        self._rows.clear()
        self._last_id = 0
        self._inproc.clear()

    @staticmethod
    def describe(event: EventRow, jobs: Mapping[int, JobRow]) -> tuple[str, str]:
        """(node, what) of one event."""
        rank = event.data.get("node_rank")
        if rank is None and event.job is not None and event.job in jobs:
            rank = jobs[event.job].node_rank
        node = f"r{rank}" if rank is not None else "-"
        if event.kind == "recovery":
            return node, f"{event.message}: {format_phases(event.data.get('phases') or {})}"
        return node, event.message

    @staticmethod
    def inproc_cells(recovery: InprocRecovery) -> Cells:
        """(time, kind, node, what) of one in-process recovery."""
        nodes = sorted({uid[1 : uid.index("r")] for uid in recovery.lost if uid.startswith("n") and "r" in uid})
        style = INPROC_STYLES[recovery.path] if recovery.finished or recovery.path == "fallback" else "yellow"
        return (
            format_clock(recovery.detected),
            Text("inproc", style=style),
            ",".join(f"r{node}" for node in nodes) or "-",
            format_inproc(recovery.to_json()),
        )

    def show_inproc(self, recoveries: Iterable[InprocRecovery]) -> None:
        """Add a row for each new in-process recovery, rewrite one whose phases moved on."""
        at_end = self.is_vertical_scroll_end
        added = rewritten = False
        for recovery in recoveries:
            key = f"inproc:{recovery.detected!r}"
            cells = self.inproc_cells(recovery)
            if self._inproc.get(key) == cells:
                continue
            if key in self._inproc:
                self._rows = deque(((k, cells if k == key else c) for k, c in self._rows), maxlen=MAX_ROWS)
                rewritten = True
            else:
                if len(self._rows) == MAX_ROWS:
                    self.remove_row(self._rows[0][0])
                self._rows.append((key, cells))
                self.add_row(*cells, key=key, height=None)
                added = True
            self._inproc[key] = cells
        if rewritten:
            # Rebuilt, not update_cell: a wrapped row's height follows its new text only when added.
            self.clear()
            for key, cells in self._rows:
                self.add_row(*cells, key=key, height=None)
        if (added or rewritten) and at_end:
            self.call_after_refresh(self.scroll_end, animate=False)

    def append(self, new_events: Iterable[EventRow], jobs: Mapping[int, JobRow]) -> None:
        """Add new events at the bottom, following the end when the view is there."""
        at_end = self.is_vertical_scroll_end
        added = False
        for event in new_events:
            if event.id <= self._last_id:
                continue  # already shown
            self._last_id = event.id
            node, what = self.describe(event, jobs)
            key = f"event:{event.id}"
            cells: Cells = (
                format_clock(event.time),
                Text(event.kind, style=KIND_STYLES.get(event.kind, "")),
                node,
                what,
            )
            if len(self._rows) == MAX_ROWS:
                self.remove_row(self._rows[0][0])
            self._rows.append((key, cells))
            self.add_row(*cells, key=key, height=None)  # long messages wrap
            added = True
        if added and at_end:
            self.call_after_refresh(self.scroll_end, animate=False)
