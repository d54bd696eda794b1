"""`FailureTimeline`: the run's failures and what followed them (recovery phases
detected → resubmitted → allocated → rendezvous → first step, full restarts, hangs,
Slurm requeues, cancels), oldest first.  Events only ever append."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from rich.text import Text
from textual import events
from textual.widgets import DataTable

from fm9g.orchestrator.state import EventRow, JobRow
from fm9g.orchestrator.tui.format import format_clock, format_phases

KIND_STYLES = {
    "failure": "red",
    "recovery": "green",
    "full_restart": "bold red",
    "hang": "red",
    "requeued_by_slurm": "yellow",
    "cancel": "magenta",
    "stage_end": "blue",
}
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
