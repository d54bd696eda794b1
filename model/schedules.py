"""FM9G learning-rate schedules: cosine, warmup-stable-drop (WSD), warmup-stable-exp.

Semantics follow the FM9G/cpm trainer's schedulers (BMTrain `WarmupLRScheduler`
subclasses): the scheduler is built with num_iter = the start step and immediately sets
the lr for that iteration; `step()` advances num_iter by one and sets every param
group's lr to the schedule applied to *that group's* base lr, so the muP group keeps its
lr / scale_width ratio.  The trainer calls `step()` after each optimizer step, so the
update of step s (1-based) uses schedule(s - 1): with warmup, the very first update has
lr 0, exactly as in FM9G.

`resume_no_optimze` (sic): for that many iterations after a resume, cosine gives lr 0
and WSD/exp re-warm linearly from 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

ScheduleName = Literal["cosine", "warmupstabledrop", "warmupstableexp"]


def resolve_iters(value: float, train_iters: int) -> int:
    """A step count, or a fraction of train_iters when 0 < value < 1 (FM9G's rule)."""
    return int(train_iters * value) if 0 < value < 1 else int(value)


class LRSchedule(ABC):
    """Base: warmup, resume window, per-group base lrs, state_dict; subclasses give the decay."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_iter: int,
        end_iter: int,
        num_iter: int = 0,
        resume_no_optimze: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self._start_lr = lr
        self.start_lr = [group["lr"] for group in optimizer.param_groups]  # per-group base lr
        self.warmup_iter = warmup_iter
        self.end_iter = end_iter
        self.num_iter = num_iter
        self.resume_step = num_iter
        self.resume_no_optimze = resume_no_optimze
        self._current_lr = 0.0
        self.step(num_iter)

    @abstractmethod
    def decay(self, num_iter: int, base_lr: float) -> float:
        """The lr after warmup; each schedule defines it."""

    def resume_lr(self, num_iter: int, base_lr: float) -> float:
        """The lr inside the resume_no_optimze window: a re-warmup from 0 (cosine overrides with 0)."""
        return base_lr * (num_iter - self.resume_step) / self.resume_no_optimze

    def lr_at(self, num_iter: int, base_lr: float) -> float:
        """The schedule: resume window, then warmup, then the decay of the subclass."""
        if num_iter < self.resume_step + self.resume_no_optimze:
            return self.resume_lr(num_iter, base_lr)
        if num_iter < self.warmup_iter:
            return base_lr * num_iter / self.warmup_iter
        return self.decay(num_iter, base_lr)

    @property
    def current_lr(self) -> float:
        """The schedule applied to the configured lr at the current iteration."""
        return self._current_lr

    def step(self, num_iter: int | None = None) -> None:
        """Advance one iteration (or jump to `num_iter`) and set every group's lr."""
        self.num_iter = self.num_iter + 1 if num_iter is None else num_iter
        self._current_lr = self.lr_at(self.num_iter, self._start_lr)
        for group, base_lr in zip(self.optimizer.param_groups, self.start_lr):
            group["lr"] = self.lr_at(self.num_iter, base_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "_start_lr": self._start_lr,
            "start_lr": list(self.start_lr),
            "warmup_iter": self.warmup_iter,
            "end_iter": self.end_iter,
            "num_iter": self.num_iter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_lr = state["_start_lr"]
        self.start_lr = list(state["start_lr"])
        self.warmup_iter = state["warmup_iter"]
        self.end_iter = state["end_iter"]
        self.num_iter = state["num_iter"]
        self.step(self.num_iter)


class Cosine(LRSchedule):
    """Linear warmup, then cosine from lr down to 0.1 * lr at end_iter, flat afterwards."""

    def decay(self, num_iter: int, base_lr: float) -> float:
        progress = min(1.0, (num_iter - self.warmup_iter) / max(1, self.end_iter - self.warmup_iter))
        return max(0.1 * base_lr, base_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))))

    def resume_lr(self, num_iter: int, base_lr: float) -> float:
        return 0.0


class WarmupStableDrop(LRSchedule):
    """Linear warmup, constant lr, then a linear drop to 0.1 * lr over the last drop_iter steps."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_iter: int,
        end_iter: int,
        drop_iter: int,
        num_iter: int = 0,
        resume_no_optimze: int = 0,
    ) -> None:
        self.drop_iter = drop_iter
        super().__init__(optimizer, lr, warmup_iter, end_iter, num_iter, resume_no_optimze)

    def decay(self, num_iter: int, base_lr: float) -> float:
        # drop_iter <= 0: no drop phase (the original divided by zero past end_iter).
        if self.drop_iter <= 0 or num_iter <= self.end_iter - self.drop_iter:
            return base_lr
        return base_lr * (0.1 + max(0.9 * (self.end_iter - num_iter) / self.drop_iter, 0.0))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "drop_iter": self.drop_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_iter = state.get("drop_iter", self.drop_iter)
        super().load_state_dict(state)


class WarmupStableExp(LRSchedule):
    """Linear warmup, constant lr until drop_begin, then lr * drop_rate ** ((n - drop_begin) / drop_iter)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_iter: int,
        end_iter: int,
        drop_begin: int,
        drop_rate: float,
        drop_iter: int,
        num_iter: int = 0,
        resume_no_optimze: int = 0,
    ) -> None:
        # drop_begin < 0 means "right after warmup" (train.drop_begin's documented meaning).
        self.drop_begin = drop_begin if drop_begin >= 0 else warmup_iter
        self.drop_rate = drop_rate
        self.drop_iter = drop_iter  # the half-life when drop_rate is 0.5; <= 0 disables the decay
        super().__init__(optimizer, lr, warmup_iter, end_iter, num_iter, resume_no_optimze)

    def decay(self, num_iter: int, base_lr: float) -> float:
        if self.drop_iter <= 0 or num_iter <= self.drop_begin:
            return base_lr
        return base_lr * self.drop_rate ** ((num_iter - self.drop_begin) / self.drop_iter)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "drop_begin": self.drop_begin,
            "drop_rate": self.drop_rate,
            "drop_iter": self.drop_iter,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drop_begin = state.get("drop_begin", self.drop_begin)
        self.drop_rate = state.get("drop_rate", self.drop_rate)
        self.drop_iter = state.get("drop_iter", self.drop_iter)
        super().load_state_dict(state)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    lr: float,
    train_iters: int,
    warmup_iters: float,
    drop_iters: float = 0.0,
    drop_begin: int = -1,
    drop_rate: float = 0.5,
    start_step: int = 0,
    resume_no_optimze: int = 0,
) -> LRSchedule:
    """The schedule named `name` (case-insensitive), positioned at `start_step`."""
    warmup = resolve_iters(warmup_iters, train_iters)
    drop = resolve_iters(drop_iters, train_iters)
    kind = name.lower()
    if kind == "cosine":
        return Cosine(optimizer, lr, warmup, train_iters, start_step, resume_no_optimze)
    if kind == "warmupstabledrop":
        return WarmupStableDrop(optimizer, lr, warmup, train_iters, drop, start_step, resume_no_optimze)
    if kind == "warmupstableexp":
        return WarmupStableExp(
            optimizer, lr, warmup, train_iters, drop_begin, drop_rate, drop, start_step, resume_no_optimze
        )
    raise ValueError(f"unknown lr_scheduler {name!r}: use cosine, warmupstabledrop or warmupstableexp")
