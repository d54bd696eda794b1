"""`RunHeader`: one line naming the selected run, its status, executor and owner, and
the read-only notice when the run belongs to someone else."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from fm9g.orchestrator.tui.format import state_style
from fm9g.orchestrator.views import RunView


class RunHeader(Widget):
    DEFAULT_CSS = """
    RunHeader { height: 1; background: $panel; color: $foreground; }
    """

    view: reactive[RunView | None] = reactive(None, always_update=True)
    read_only: reactive[bool] = reactive(False)

    def render(self) -> Text:
        text = Text(" fm9g-launch ", style="bold")
        view = self.view
        if view is None:
            text.append("│ no run selected", style="dim")
            return text
        text.append("│ ")
        text.append(view.run.name, style="bold")
        text.append(" ")
        text.append(view.status, style=state_style(view.status))
        if view.executor:
            text.append(f" │ {view.executor}")
        if view.owner:
            text.append(f" │ owner {view.owner}")
        if self.read_only:
            text.append(" │ ")
            text.append("READ-ONLY", style="bold reverse yellow")
        if view.error:
            text.append(f" │ {view.error.short()}", style="red")
        return text
