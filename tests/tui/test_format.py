"""The TUI's formatting helpers, and the numbers views.py derives for it, with no app."""

from __future__ import annotations

import math

import pytest

from fm9g.orchestrator.tui.format import (
    format_elapsed,
    format_eta,
    format_loss,
    format_lr,
    format_node_seconds,
    format_phases,
    format_rate,
    format_state,
    job_label,
    progress_bar,
    sparkline,
    state_style,
    truncate,
)
from fm9g.orchestrator.views import elapsed as elapsed_of
from fm9g.orchestrator.views import estimate_eta


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-1, "-"),
        (math.inf, "-"),
        (0, "0s"),
        (59.4, "59s"),
        (61, "1m01s"),
        (3600, "1h00m"),
        (3 * 86400 + 7200, "3d02h"),
    ],
)
def test_format_eta(seconds: float | None, text: str) -> None:
    assert format_eta(seconds) == text


def test_format_node_seconds() -> None:
    assert format_node_seconds(None) == "-"
    assert format_node_seconds(37.24) == "37.2 node-seconds"
    assert format_node_seconds(37.24, short=True) == "37.2 node-s"
    assert format_node_seconds(2 * 3600 + 1260) == "2.35 node-hours"
    assert format_node_seconds(7200, short=True) == "2.00 node-h"


def test_format_elapsed() -> None:
    assert format_elapsed(None) == "-"
    assert format_elapsed(65) == "1:05"
    assert format_elapsed(3725) == "1:02:05"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        ("x", "-"),
        (True, "-"),
        (math.nan, "-"),
        (950, "950"),
        (12_345, "12.3k"),
        (4_560_000, "4.56M"),
        (2.5e9, "2.5G"),
    ],
)
def test_format_rate(value: object, text: str) -> None:
    assert format_rate(value) == text


def test_loss_and_lr() -> None:
    assert format_loss(2.345678) == "2.3457"
    assert format_loss(None) == "-"
    assert format_lr(3e-4) == "3.00e-04"


def test_format_state_shows_why() -> None:
    assert format_state("PENDING", "Resources") == "PENDING Resources"
    assert format_state("FAILED", "", 1) == "FAILED rc=1"
    assert format_state("NODE_FAIL", "node lost") == "NODE_FAIL node lost"
    assert format_state("RUNNING", "stale reason") == "RUNNING"
    assert format_state("COMPLETED", "", 0) == "COMPLETED"


def test_state_style() -> None:
    assert state_style("RUNNING") == "green"
    assert state_style("PENDING") == "yellow"
    assert state_style("NODE_FAIL") == "red"


def test_format_phases() -> None:
    phases = {"detected": 100.0, "resubmitted": 100.4, "allocated": 127.5, "rendezvous": 132.0, "first_step": 134.8}
    assert format_phases(phases) == "resub +0.4s alloc +27.5s rdzv +32.0s step +34.8s"
    assert format_phases({"detected": 100.0}) == "detected"
    assert format_phases({}) == "-"


def test_progress_bar() -> None:
    assert progress_bar(0, 10, 8) == " " * 8
    assert progress_bar(10, 10, 8) == "█" * 8
    assert progress_bar(5, 10, 8) == "████    "
    assert progress_bar(1, 16, 8) == "▌       "
    assert progress_bar(20, 10, 4) == "████"
    assert progress_bar(1, 0, 4) == "    "
    assert progress_bar(1, 2, 0) == ""


def test_sparkline() -> None:
    assert sparkline([], 10) == ""
    assert sparkline([1.0, 2.0], 0) == ""
    assert sparkline([0, 7], 10) == "▁█"
    assert sparkline([3, 3, 3], 10) == "▄▄▄"
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    # more points than cells: bucket means over the whole series, width exactly
    line = sparkline(list(range(100)), 10)
    assert len(line) == 10 and line[0] == "▁" and line[-1] == "█"
    assert sparkline([1.0, math.nan, 2.0], 5) == "▁█"


def test_estimate_eta_from_timestamps() -> None:
    samples = [(100, 1_700_000_000.0), (110, 1_700_000_020.0)]  # 2 s per step
    assert estimate_eta(samples, 200) == pytest.approx(180.0)
    assert estimate_eta(samples, 110) == 0.0
    assert estimate_eta(samples, None) is None
    assert estimate_eta([(100, 1_700_000_000.0)], 200) is None  # one timestamp: no rate


def test_estimate_eta_from_step_durations() -> None:
    assert estimate_eta([(10, 0.5), (11, 1.5)], 20) == pytest.approx(9.0)
    assert estimate_eta([], 20) is None


def test_job_label_and_misc() -> None:
    assert job_label(2, 1, "worker", True) == " a2 r1 worker"
    assert job_label(2, 3, "worker", False) == "    r3 worker"
    assert truncate("abcdef", 4) == "abc…"
    assert truncate("abc", 4) == "abc"
    assert elapsed_of(None, None, 10.0) is None
    assert elapsed_of(1.0, None, 10.0) == 9.0
    assert elapsed_of(1.0, 4.0, 10.0) == 3.0
