"""Which line comes next: per-task shuffled line orders and the weighted task choice.

The whole sample order of a rank is a deterministic function of (seed, rank,
world_size) and the data sizes, and its state is small: per task an epoch number, a
cursor into that epoch's order, the running average segment length and the
alive flag, plus the task-choice RNG state.

Line orders: a rank owns the strided lines rank, rank + world_size, ... of a task
(when a task has fewer lines than ranks and allow_repeat is set, rank r shares line
r mod n). An epoch visits the owned lines in a permutation derived from (seed, task,
epoch, rank): blocks of `BLOCK` consecutive owned lines in shuffled order, each block
internally shuffled. Nothing per line is stored; a position maps to a line with two
small permutations, so memory stays flat for very large datasets.

Task choice: probability ∝ abs_weight / average segment length (running EMA
0.98/0.02 of produced segment lengths, max_length while unknown), the token-share
rule of the original; without abs_weight, ∝ weight × data bytes. A task that runs
out restarts with a new epoch when allow_repeat is set, otherwise it is removed from
the choice; when no task is left the stream ends.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

# Owned lines per shuffle block: big enough that the block order is cheap to hold,
# small enough that lines from all over the data mix within an epoch.
BLOCK = 1024
EMA_KEEP = 0.98


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & 0xFFFFFFFF for w in words])))


def _task_word(name: str) -> int:
    """A stable 32-bit number for a task name (Python's hash() changes per process)."""
    value = 2166136261
    for byte in name.encode("utf-8"):
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


class LineOrder:
    """The shuffled order of one task's lines owned by one rank, epoch by epoch."""

    def __init__(self, nlines: int, rank: int, world_size: int, seed: int, task: str, allow_repeat: bool) -> None:
        self.nlines = nlines
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.task_word = _task_word(task)
        if nlines > rank:
            self.owned = (nlines - rank + world_size - 1) // world_size
            self._shared = False
        else:
            # fewer lines than ranks: share a line only when repeats are allowed
            self.owned = 1 if (allow_repeat and nlines > 0) else 0
            self._shared = True
        # Small caches: the current read position and the prefetch look-ahead may sit
        # in different blocks (or epochs), so keep a few of each.
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: dict[tuple[int, int], tuple[int, int, int, list[int]]] = {}
        self._last: tuple[int, int, int, int, list[int]] = (-1, 0, 0, 0, [])

    def _epoch_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, first position of each slot) of an epoch."""
        found = self._epochs.get(epoch)
        if found is None:
            blocks = (self.owned + BLOCK - 1) // BLOCK
            order = _rng(self.seed, self.task_word, epoch, self.rank, 0xB10C).permutation(blocks)
            sizes = np.minimum(BLOCK, self.owned - order * BLOCK)
            found = (order, np.concatenate([[0], np.cumsum(sizes)]))
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[epoch] = found
        return found

    def line_at(self, epoch: int, position: int) -> int:
        """Global line id at `position` (0 <= position < owned) of `epoch`."""
        if self._shared:
            return self.rank % self.nlines
        last_epoch, low, high, block, inner = self._last
        if last_epoch != epoch or not low <= position < high:
            order, starts = self._epoch_blocks(epoch)
            slot = int(np.searchsorted(starts, position, side="right")) - 1
            cached = self._blocks.get((epoch, slot))
            if cached is None:
                block = int(order[slot])
                size = min(BLOCK, self.owned - block * BLOCK)
                inner = _rng(self.seed, self.task_word, epoch, self.rank, block + 1).permutation(size).tolist()
                low = int(starts[slot])
                cached = (low, low + size, block, inner)
                if len(self._blocks) >= 8:
                    self._blocks.pop(next(iter(self._blocks)))
                self._blocks[(epoch, slot)] = cached
            low, high, block, inner = cached
            self._last = (epoch, low, high, block, inner)
        local = block * BLOCK + inner[position - low]
        return self.rank + local * self.world_size


@dataclass
class TaskInfo:
    """What the sampler needs to know about a task."""

    name: str
    nlines: int
    weight: float  # abs_weight (token share) or weight × bytes (per sample)
    ave_tokens: float  # initial average segment length; <= 0: unknown
    allow_repeat: bool


@dataclass
class TaskCursor:
    """Per-task sampler state."""

    epoch: int = 0
    cursor: int = 0
    ema: float = -1.0
    alive: bool = True


class MixtureSampler:
    """Chooses the task of each sample and the next line of a task; small, exact state."""

    def __init__(
        self, tasks: list[TaskInfo], *, seed: int, rank: int, world_size: int, max_length: int, token_share: bool
    ) -> None:
        self.tasks = tasks
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_length = max_length
        self.token_share = token_share
        self.orders = [LineOrder(t.nlines, rank, world_size, seed, t.name, t.allow_repeat) for t in tasks]
        self.cursors = [
            TaskCursor(
                ema=min(t.ave_tokens, max_length) if t.ave_tokens > 0 else -1.0, alive=order.owned > 0 and t.weight > 0
            )
            for t, order in zip(tasks, self.orders)
        ]
        self.rng = _rng(seed, rank, world_size, 0x5A3)

    def choose_task(self) -> int | None:
        """A task drawn by weight among the alive ones; None when all have stopped."""
        weights = []
        for task, state in zip(self.tasks, self.cursors):
            if not state.alive:
                weights.append(0.0)
            elif self.token_share:
                weights.append(task.weight / (state.ema if state.ema > 0 else self.max_length))
            else:
                weights.append(task.weight)
        total = sum(weights)
        if total <= 0:
            return None
        cumulative = list(itertools.accumulate(weights))
        point = float(self.rng.random()) * total
        index = bisect.bisect_right(cumulative, point)
        while index >= len(weights) or weights[index] == 0.0:  # float edge at the very top
            index -= 1
        return index

    def next_line(self, task: int) -> tuple[int, int] | None:
        """(line, epoch) of the task's next line, advancing it; None when the task stops."""
        state, order = self.cursors[task], self.orders[task]
        if state.cursor >= order.owned:
            if not self.tasks[task].allow_repeat or order.owned == 0:
                state.alive = False
                return None
            state.epoch += 1
            state.cursor = 0
        line = order.line_at(state.epoch, state.cursor)
        state.cursor += 1
        return line, state.epoch

    def upcoming(self, task: int, start: tuple[int, int], count: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """Up to `count` (line, epoch) pairs from position `start` = (epoch, cursor), without advancing."""
        epoch, cursor = start
        order = self.orders[task]
        out: list[tuple[int, int]] = []
        while len(out) < count:
            if cursor >= order.owned:
                if not self.tasks[task].allow_repeat or order.owned == 0:
                    break
                epoch, cursor = epoch + 1, 0
            out.append((order.line_at(epoch, cursor), epoch))
            cursor += 1
        return out, (epoch, cursor)

    def observe(self, task: int, length: int) -> None:
        """Update the task's running average segment length with a produced segment."""
        state = self.cursors[task]
        state.ema = float(length) if state.ema < 0 else EMA_KEEP * state.ema + (1 - EMA_KEEP) * length

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (JSON- and torch-serialisable)."""
        return {
            "rng": self.rng.bit_generator.state,
            "tasks": {
                task.name: {"epoch": s.epoch, "cursor": s.cursor, "ema": s.ema, "alive": s.alive, "nlines": task.nlines}
                for task, s in zip(self.tasks, self.cursors)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> dict[str, str]:
        """Restore; returns {task: warning} for tasks that start afresh (new, or data changed)."""
        warnings: dict[str, str] = {}
        self.rng.bit_generator.state = state["rng"]
        saved = state["tasks"]
        for index, task in enumerate(self.tasks):
            entry = saved.get(task.name)
            if entry is None:
                warnings[task.name] = f"task {task.name} is new: it starts from its first epoch"
                continue
            if int(entry["nlines"]) != task.nlines:
                warnings[task.name] = (
                    f"task {task.name} had {entry['nlines']} lines when saved and has {task.nlines} now: it restarts"
                )
                continue
            self.cursors[index] = TaskCursor(
                epoch=int(entry["epoch"]),
                cursor=int(entry["cursor"]),
                ema=float(entry["ema"]),
                alive=bool(entry["alive"]),
            )
        for name in saved:
            if name not in {t.name for t in self.tasks}:
                warnings[name] = f"task {name} in the saved state is no longer in the mixture: ignored"
        return warnings
