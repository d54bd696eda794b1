"""`RunList`: the runs under the runs directory, with their status; moving the
highlight selects a run (posted up as `RunList.RunSelected`)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from fm9g.orchestrator.tui.format import state_style
from fm9g.orchestrator.views import RunSummary

STATUS_MARKS = {"RUNNING": "▶", "COMPLETED": "✓", "FAILED": "✗", "CANCELLED": "■", "PENDING": "…", "UNREADABLE": "?"}


class RunList(OptionList):
    DEFAULT_CSS = """
    RunList { border: none; padding: 0; }
    """

    class RunSelected(Message):
        def __init__(self, path: Path) -> None:
            self.path = path
            super().__init__()

    runs: reactive[tuple[RunSummary, ...]] = reactive((), always_update=False)

    def __init__(self, selected: Path | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.selected = selected

    def watch_runs(self, runs: tuple[RunSummary, ...]) -> None:
        current = self.selected
        self.clear_options()
        self.add_options(Option(self._label(run), id=str(run.path)) for run in runs)
        if not runs:
            return
        paths = [run.path for run in runs]
        index = paths.index(current) if current in paths else 0
        # Setting the highlight posts OptionHighlighted; it selects the same run again, harmlessly.
        self.highlighted = index

    @staticmethod
    def _label(run: RunSummary) -> Text:
        text = Text(f"{STATUS_MARKS.get(run.status, '·')} ", style=state_style(run.status))
        text.append(run.name)
        return text

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        if event.option.id is None:
            return
        path = Path(event.option.id)
        if path != self.selected:
            self.selected = path
            self.post_message(self.RunSelected(path))
