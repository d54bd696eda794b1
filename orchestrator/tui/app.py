"""The `fm9g-launch tui` application: `make_app` builds it for a run or a runs
directory.  Layout lives in app.tcss; the screens and widgets in their packages."""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from fm9g.orchestrator.tui.screens.help import HelpScreen
from fm9g.orchestrator.tui.screens.main import MainScreen
from fm9g.orchestrator.views import runs_root_of


class LaunchTui(App[None]):
    """Watches fm9g-launch runs through their run directories."""

    CSS_PATH = "app.tcss"
    TITLE = "fm9g-launch"
    # Narrow terminals (ssh at 80x24) show the log or the failures; wide ones both.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [Binding("q", "quit", "Quit"), Binding("question_mark", "help", "Help")]
    ENABLE_COMMAND_PALETTE = False

    def __init__(
        self, runs_root: Path, selected: Path | None, *, user: str, interval: float, clock: Callable[[], float]
    ) -> None:
        super().__init__()
        self.runs_root = runs_root
        self.selected = selected
        self.user = user
        self.interval = interval
        self.clock = clock

    def get_default_screen(self) -> MainScreen:
        return MainScreen(self.runs_root, self.selected, user=self.user, interval=self.interval, clock=self.clock)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def make_app(
    target: Path, *, user: str | None = None, interval: float = 1.0, clock: Callable[[], float] = time.time
) -> LaunchTui:
    """The app for `target`: a run directory (its siblings are listed, it is selected) or a
    directory of runs.  `user` decides read-only (default: the login name); `clock` gives
    "now" for elapsed times and ETAs.

    It takes no StateStore: every refresh reads in its own worker thread, and a sqlite
    connection belongs to the thread that opened it, so each worker opens its own."""
    target = Path(target).resolve()
    selected = target if (target / "config.yaml").exists() else None
    return LaunchTui(runs_root_of(target), selected, user=user or getpass.getuser(), interval=interval, clock=clock)
