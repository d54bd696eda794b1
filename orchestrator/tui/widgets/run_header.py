"""`RunHeader`: one line naming the selected run, its status, executor and owner, the
node-seconds its training nodes spent waiting for the rest, its supervisor job
(supervise.where: job) and that job's phase, and the read-only notice when the run
belongs to someone else.

Waiting is shown here, not in the training panel: it grows before the first step,
while the panel still has no metrics to show."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from fm9g.orchestrator.supervisor_state import SupervisorPhase
from fm9g.orchestrator.tui.format import format_node_seconds, state_style
from fm9g.orchestrator.views import RunView

PHASE_STYLES = {
    SupervisorPhase.QUEUED: "yellow",
    SupervisorPhase.RUNNING: "green",
    SupervisorPhase.LOST: "bold red",
    SupervisorPhase.ENDED: "dim",
}


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
        # What must not be cut off at a narrow width first; the figures after it.
        if self.read_only:
            text.append(" │ ")
            text.append("READ-ONLY", style="bold reverse yellow")
        if view.error:
            text.append(f" │ {view.error.short()}", style="red")
        if view.waiting_node_s is not None and view.waiting_node_s >= 0.05:  # shown only when not 0.0
            text.append(f" │ waiting {format_node_seconds(view.waiting_node_s, short=True)}")
        if view.supervisor is not None:
            text.append(f" │ supervisor job {view.supervisor.job_id} ")
            text.append(view.supervisor.phase.value, style=PHASE_STYLES[view.supervisor.phase])
        elif view.supervisor_job:
            text.append(f" │ supervisor job {view.supervisor_job}")
        return text
