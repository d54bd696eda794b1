"""Pure formatting helpers of the TUI: numbers, durations, sparklines, job labels.

Nothing here touches a widget, a file or the clock, so each helper is tested alone
(tests/tui/test_format.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

__all__ = [
    "format_elapsed",
    "format_eta",
    "format_node_seconds",
    "format_rate",
    "format_loss",
    "format_lr",
    "format_state",
    "format_clock",
    "format_phases",
    "format_inproc",
    "progress_bar",
    "sparkline",
    "job_label",
    "truncate",
    "state_style",
]

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
RECOVERY_PHASES = ("resubmitted", "allocated", "rendezvous", "first_step")
PHASE_LABELS = {"resubmitted": "resub", "allocated": "alloc", "rendezvous": "rdzv", "first_step": "step"}
INPROC_PHASE_LABELS = {"re_formed": "formed", "state_synced": "synced", "first_step": "step"}


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_elapsed(seconds: float | None) -> str:
    """A run time as 'M:SS' or 'H:MM:SS'; '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_node_seconds(value: float | None, short: bool = False) -> str:
    """Node-seconds as '37.2 node-seconds', or in node-hours from one hour on ('2.35
    node-hours'); `short` writes 'node-s'/'node-h'.  '-' when unknown."""
    if value is None or not math.isfinite(value):
        return "-"
    if value >= 3600:
        return f"{value / 3600:.2f} " + ("node-h" if short else "node-hours")
    return f"{value:.1f} " + ("node-s" if short else "node-seconds")


def format_eta(seconds: float | None) -> str:
    """A coarse remaining time: '45s', '12m05s', '3h07m', '2d04h'; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(value: object) -> str:
    """A throughput with an SI suffix: 950, 12.3k, 4.56M; '-' when missing."""
    number = _finite(value)
    if number is None:
        return "-"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.0f}"


def format_loss(value: object) -> str:
    number = _finite(value)
    return "-" if number is None else f"{number:.4f}"


def format_lr(value: object) -> str:
    number = _finite(value)
    return "-" if number is None else f"{number:.2e}"


def format_state(state: str, reason: str = "", exit_code: int | None = None) -> str:
    """A job's state with why it is there: 'PENDING Resources', 'FAILED rc=1'."""
    state = str(getattr(state, "value", state))  # a JobState formats as 'JobState.X' in an f-string
    if state in ("PENDING", "SUBMITTING") and reason:
        return f"{state} {reason}"
    if state in ("FAILED", "OUT_OF_MEMORY") and exit_code not in (None, 0):
        return f"{state} rc={exit_code}"
    if reason and state not in ("RUNNING", "COMPLETED"):
        return f"{state} {reason}"
    return state


def format_clock(seconds: float | None) -> str:
    """Local wall-clock time of a timestamp, HH:MM:SS."""
    if seconds is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def format_phases(phases: dict[str, float]) -> str:
    """A recovery timeline as offsets from detection: 'resub +0.4s alloc +2.1s ... = 6.8s'."""
    start = _finite(phases.get("detected"))
    if start is None:
        return "-"
    marks = []
    for phase in RECOVERY_PHASES:
        value = _finite(phases.get(phase))
        if value is not None:
            marks.append(f"{PHASE_LABELS[phase]} +{value - start:.1f}s")
    return " ".join(marks) if marks else "detected"


def format_inproc(recovery: dict) -> str:
    """An in-process recovery (its `status --json` object) in one line:
    'shrink fast, world 4→3, 1 step lost: formed +1.7s step +3.0s = 3.0s'."""
    phases = recovery.get("phases") or {}
    marks = [
        f"{label} +{value:.1f}s"
        for name, label in INPROC_PHASE_LABELS.items()
        if (value := _finite(phases.get(name))) is not None
    ]
    lost = recovery.get("steps_lost", 0)
    world = f"world {recovery.get('world_before') or '?'}→{recovery.get('world_after') or '?'}"
    head = f"{recovery.get('policy')} {recovery.get('path')}, {world}, {lost} step{'' if lost == 1 else 's'} lost"
    total = _finite(recovery.get("total_s"))
    tail = f" = {total:.1f}s" if total is not None else " (in progress)"
    return f"{head}: {' '.join(marks) or 'detected'}{tail}"


def truncate(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def progress_bar(done: float, total: float, width: int) -> str:
    """A text bar of `width` cells, eighths resolved: '███▌    '."""
    if width <= 0:
        return ""
    fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    eighths = int(round(fraction * width * 8))
    full, rest = divmod(eighths, 8)
    bar = "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest and full < width else "")
    return bar.ljust(width)[:width]


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values (or bucket means of all, if there are more) as block
    characters scaled between their min and max; non-finite values are skipped."""
    points = [float(v) for v in values if _finite(v) is not None]
    if width <= 0 or not points:
        return ""
    if len(points) > width:
        # Bucket means keep the curve's shape over the whole history, not just its tail.
        buckets = []
        for index in range(width):
            lo = index * len(points) // width
            hi = max(lo + 1, (index + 1) * len(points) // width)
            chunk = points[lo:hi]
            buckets.append(sum(chunk) / len(chunk))
        points = buckets
    low, high = min(points), max(points)
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return SPARK_BLOCKS[3] * len(points)
    scale = (len(SPARK_BLOCKS) - 1) / (high - low)
    return "".join(SPARK_BLOCKS[int(round((v - low) * scale))] for v in points)


def job_label(attempt: int, node_rank: int, role: str, first_of_attempt: bool) -> str:
    """The tree column of a job row: ' a2 r1 worker' on an attempt's first row, else '    r2 worker'."""
    prefix = f"a{attempt}" if first_of_attempt else ""
    return f" {prefix:<3}r{node_rank} {role}"


STATE_STYLES = {
    "RUNNING": "green",
    "COMPLETING": "green",
    "COMPLETED": "blue",
    "SKIPPED": "dim",
    "NEW": "dim",
    "PENDING": "yellow",
    "SUBMITTING": "yellow",
    "CONFIGURING": "yellow",
    "REQUEUED": "yellow",
    "SUSPENDED": "yellow",
    "UNKNOWN": "magenta",
    "CANCELLED": "magenta",
}


def state_style(state: str) -> str:
    """The colour of a job or stage state: failures red, waiting yellow, running green."""
    return STATE_STYLES.get(state, "red")
