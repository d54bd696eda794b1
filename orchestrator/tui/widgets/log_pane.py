"""`LogPane`: the followed job's log; the refresh worker reads it (LogFollower) and
the screen writes each chunk here, marking where the file was truncated or rotated."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Log

from fm9g.orchestrator.tui.logtail import LogChunk


class LogPane(Log):
    DEFAULT_CSS = """
    LogPane { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=5000, highlight=False, auto_scroll=True, **kwargs)  # type: ignore[arg-type]
        self.path: Path | None = None

    def follow(self, path: Path | None, label: str) -> None:
        """Show another file: clear, and title the pane with `label`."""
        self.path = path
        self.clear()
        self.border_title = f"log · {label}"
        if path is None:
            self.write("(no log for this row)\n")

    def add(self, chunk: LogChunk) -> None:
        """Write one poll's text."""
        if chunk.before:
            self.write(chunk.before)
        if chunk.reopened:
            if self.lines and self.lines[-1]:
                self.write("\n")
            self.write("──── log truncated or rotated: following the new file ────\n")
        if chunk.text:
            self.write(chunk.text)
