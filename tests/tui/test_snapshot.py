"""One SVG snapshot of the main screen at a fixed size (pytest-textual-snapshot).

Regenerate after an intended change of the layout with
`pytest tests/tui/test_snapshot.py --snapshot-update` and look at the SVG."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fm9g.orchestrator.tui.app import make_app

from .conftest import NOW, make_demo_run


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The failure timeline prints local clock times: pin the zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_main_screen(snap_compare, tmp_path: Path, utc, settle) -> None:  # type: ignore[no-untyped-def]
    demo = make_demo_run(tmp_path / "runs", owner="alice")
    app = make_app(demo.run.root, clock=lambda: NOW, user="alice", interval=3600)
    assert snap_compare(app, terminal_size=(100, 30), run_before=settle)
