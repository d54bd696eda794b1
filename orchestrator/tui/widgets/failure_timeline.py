"""`FailureTimeline`: the run's failures and what followed them (recovery phases
detected → resubmitted → allocated → rendezvous → first step, full restarts, hangs,
Slurm requeues, cancels), oldest first.  Events only ever append."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.text import Text
from textual.widgets import DataTable

from fm9g.orchestrator.state import EventRow, JobRow
from fm9g.orchestrator.tui.format import format_clock, format_phases

KIND_STYLES = {"failure": "red", "recovery": "green", "full_restart": "bold red", "hang": "red",
               "requeued_by_slurm": "yellow", "cancel": "magenta", "stage_end": "blue"}
MAX_ROWS = 1000


class FailureTimeline(DataTable[Text | str]):
    DEFAULT_CSS = """
    FailureTimeline { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="none", show_cursor=False, **kwargs)  # type: ignore[arg-type]
        self._count = 0
        self._last_id = 0

    def on_mount(self) -> None:
        self.add_column("time", key="time", width=8)
        self.add_column("event", key="kind", width=10)
        self.add_column("node", key="node", width=4)
        self.add_column("what", key="what")

    def reset(self) -> None:
        self.clear()
        self._count = 0
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

    def append(self, events: Iterable[EventRow], jobs: Mapping[int, JobRow]) -> None:
        """Add new events at the bottom, following the end when the view is there."""
        at_end = self.is_vertical_scroll_end
        added = False
        for event in events:
            if event.id <= self._last_id:
                continue  # already shown
            self._last_id = event.id
            node, what = self.describe(event, jobs)
            self.add_row(format_clock(event.time), Text(event.kind, style=KIND_STYLES.get(event.kind, "")),
                         node, what, key=f"event:{event.id}")
            self._count += 1
            added = True
        while self._count > MAX_ROWS:
            self.remove_row(self.coordinate_to_cell_key((0, 0)).row_key)
            self._count -= 1
        if added and at_end:
            self.call_after_refresh(self.scroll_end, animate=False)
