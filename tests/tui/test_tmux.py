"""The real `fm9g-launch tui` in a real terminal: a detached tmux session at 100x30,
read back with capture-pane.  Skipped where tmux is not installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.helpers import runs

if TYPE_CHECKING:
    from tests.tui.conftest import DemoRun

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.slow  # a real terminal: starts the TUI in tmux and polls its screen


def command_line(run: Path) -> str:
    script = Path(sys.executable).with_name("fm9g-launch")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "fm9g.orchestrator.cli"]
    return shlex.join([*launcher, "tui", str(run)])


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_tui_in_tmux_shows_the_run(demo_run: DemoRun) -> None:
    socket = f"fm9g-test-{uuid.uuid4().hex[:8]}"  # a private server: other tmux sessions are never touched
    tmux = [str(TMUX), "-L", socket, "-f", "/dev/null"]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "30",
            "-s",
            "tui",
            f"TERM=xterm-256color {command_line(demo_run.run.root)}",
        ],
        check=True,
        timeout=30,
    )
    train_iters = yaml.safe_load(demo_run.run.config.read_text())["train"]["train_iters"]
    wanted = [
        demo_run.run.name,
        "index",
        "train",
        f"step {runs.last_step(demo_run.run.root)}/{train_iters}",
        "a2 r2 worker",
    ]
    screen = ""
    try:
        deadline = time.monotonic() + 60  # a bound on waiting for the first paint, not a timing assertion
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True, timeout=10
            ).stdout
            if all(text in screen for text in wanted):
                break
            time.sleep(0.3)
        for text in wanted:
            assert text in screen, f"{text!r} not on screen:\n{screen}"
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], check=True, timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alive = subprocess.run([*tmux, "has-session", "-t", "tui"], capture_output=True, timeout=10)
            if alive.returncode != 0:
                break
            time.sleep(0.2)
        assert alive.returncode != 0, "q did not quit the TUI"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
