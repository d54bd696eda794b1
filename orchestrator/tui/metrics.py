"""`MetricsTail`: reads the trainer's metrics.jsonl incrementally (new complete lines
only; a partial last line waits for its newline), keeping a bounded history for the
sparklines and the latest value of every per-task loss."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MetricPoint:
    step: int
    loss: float | None
    lr: float | None
    grad_norm: float | None
    tokens_per_s: float | None
    time: float | None
    task_losses: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def task_losses(record: dict[str, Any]) -> dict[str, float]:
    """Per-task losses of one record, from `task_loss`/`task_losses` dicts or `loss/<task>` keys."""
    losses: dict[str, float] = {}
    for key in ("task_loss", "task_losses"):
        nested = record.get(key)
        if isinstance(nested, dict):
            for task, value in nested.items():
                number = _number(value)
                if number is not None:
                    losses[str(task)] = number
    for key, value in record.items():
        if key.startswith("loss/"):
            number = _number(value)
            if number is not None:
                losses[key[len("loss/"):]] = number
    return losses


def parse_point(record: Any) -> MetricPoint | None:
    """A MetricPoint from one decoded line, or None when it has no integer step."""
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return None
    return MetricPoint(step=int(step), loss=_number(record.get("loss")), lr=_number(record.get("lr")),
                       grad_norm=_number(record.get("grad_norm")), tokens_per_s=_number(record.get("tokens_per_s")),
                       time=_number(record.get("time")), task_losses=task_losses(record))


class MetricsTail:
    """Follows one metrics.jsonl.  Not thread-safe: one poll at a time."""

    def __init__(self, path: Path, history: int = 512, initial_bytes: int = 4 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.initial_bytes = initial_bytes
        self.points: deque[MetricPoint] = deque(maxlen=history)
        self.tasks: dict[str, float] = {}
        self._position = 0
        self._inode: tuple[int, int] | None = None
        self._pending = b""

    def _reset(self) -> None:
        self.points.clear()
        self.tasks.clear()
        self._position = 0
        self._pending = b""

    def poll(self) -> bool:
        """Read new complete lines; True when anything changed."""
        try:
            stat = os.stat(self.path)
        except OSError:
            changed = bool(self.points)
            self._reset()
            self._inode = None
            return changed
        inode = (stat.st_dev, stat.st_ino)
        changed = False
        if inode != self._inode or stat.st_size < self._position:
            changed = bool(self.points) or self._inode is not None
            self._reset()
            self._inode = inode
            if stat.st_size > self.initial_bytes:
                self._position = stat.st_size - self.initial_bytes
                self._pending = b""
                skip_first = True
            else:
                skip_first = False
        else:
            skip_first = False
        if stat.st_size == self._position:
            return changed
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._position)
                data = handle.read(stat.st_size - self._position)
        except OSError:
            return changed
        self._position += len(data)
        lines = (self._pending + data).split(b"\n")
        if skip_first:
            lines = lines[1:]  # we started mid-file: the first piece is a line's tail
        self._pending = lines.pop() if lines else b""
        if self._pending:
            # A last line without its newline: take it if it is already a whole JSON object
            # (no proper prefix of an object parses), else wait for the rest.
            try:
                json.loads(self._pending)
            except ValueError:
                pass
            else:
                lines.append(self._pending)
                self._pending = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                point = parse_point(json.loads(line))
            except ValueError:
                continue
            if point is None:
                continue
            self.points.append(point)
            self.tasks.update(point.task_losses)
            changed = True
        return changed

    @property
    def last(self) -> MetricPoint | None:
        return self.points[-1] if self.points else None
