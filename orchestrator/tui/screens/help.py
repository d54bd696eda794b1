"""`HelpScreen`: the keys and what the columns mean."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]fm9g-launch tui[/b] — watches runs through their run directories; it never polls Slurm.

[b]keys[/b]
  ↑ ↓ / tab      move in a list; tab goes to the next pane
  l              follow the highlighted job's log (again: full screen; esc: back)
  t              the failure timeline
  c              cancel the highlighted job or the whole run (asks first)
  r              resubmit the failed nodes (starts `fm9g-launch resume --detach`; asks first)
  /              filter jobs (words match stage, role, r<rank>, a<attempt>, job id, node, state)
  esc            clear the filter
  ?              this help           q  quit

[b]jobs table[/b]
  a<N>  the submission attempt      r<N>  the node rank (r0 is the master)
  rst   restarts Slurm made (requeue)   gen   the rendezvous generation
  state the Slurm state, with the pending reason or exit code

[b]cancel[/b]
  the run   raises control/cancel; when a supervisor holds the run's lock, it cancels the
            jobs itself and records the run as cancelled.  Only when none does, the TUI
            cancels them through the executor (scancel for Slurm) and records that.
  one job   always through the executor (scancel); a running supervisor then replaces
            it like a lost node.
  The failure timeline's `cancel` event says which way each cancel went.

c and r are disabled when the run belongs to another user (read-only)."""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: auto; max-width: 90; height: auto; max-height: 100%;
                                  border: round $accent; background: $surface; padding: 0 1; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)
