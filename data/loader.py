"""The packing dataloader: mixture → tokenized windows → [batch_size, max_length] batches.

`PackedLoader` draws a task per window by weight (`sampler`), takes that task's next
window (a long pretraining document yields several consecutive windows; instruction
data one), and fills rows greedily: a window that does not fit the current row
starts the next one. Each rank reads a disjoint strided share of every task.

Resume: `state_dict()` is the state right after the last batch handed to the caller
(work done ahead by prefetch workers is pure and not part of it); after
`load_state_dict`, the following batches equal those of an uninterrupted run. The
state holds per-task epoch/cursor/average, the RNG state, and references (task,
line, epoch, window number) to the partly used line of each task and to the window
carried over to the next row; these are recomputed on load, never stored as tokens.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fm9g.data.errors import DataError
from fm9g.data.mixture import Mixture, load_mixture, needs_index
from fm9g.data.packer import Placed, pack_rows
from fm9g.data.prefetch import CHUNK, Prefetcher
from fm9g.data.reader import IndexedDataset
from fm9g.data.sampler import MixtureSampler, TaskInfo
from fm9g.data.samples import LineResult, OversizeRule, SampleMaker, TaskSource
from fm9g.data.tokenizer import Tokenizer, load_tokenizer

STATE_VERSION = 1

# A window reference: (task, line, epoch, window number).
WindowRef = tuple[int, int, int, int]


class PackedLoader:
    """Iterable of packed batches over a mixture; resumable with state_dict/load_state_dict."""

    def __init__(
        self,
        mixture: Mixture | str | Path,
        tokenizer: Tokenizer | str | Path,
        *,
        batch_size: int,
        max_length: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1234,
        sft: bool = False,
        oversize_rule: OversizeRule = "segment",
        num_workers: int = 0,
        prefetch_factor: int = 2,
        num_threads: int = 1,
        prefetch: int = 1,
        on_error: Literal["fail", "skip"] = "fail",
        fail_hint: str = "or use on_error='skip' to skip such lines",
    ) -> None:
        if batch_size < 1 or max_length < 16:
            raise DataError(f"batch_size must be >= 1 and max_length >= 16 (got {batch_size}, {max_length})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if oversize_rule not in ("drop", "head", "segment") or on_error not in ("fail", "skip"):
            raise DataError(
                f"oversize_rule must be drop|head|segment and on_error fail|skip (got {oversize_rule}, {on_error})"
            )
        if num_workers < 0 or prefetch_factor < 1 or prefetch < 1 or num_threads < 1:
            raise DataError("num_workers must be >= 0, and prefetch_factor, prefetch and num_threads >= 1")
        if num_threads > 1 and num_workers == 0:
            raise DataError(
                f"num_threads={num_threads} needs num_workers >= 1: the reader threads run inside the "
                "worker processes (data.dataloader_num_threads needs data.dataloader_num_workers >= 1)"
            )
        self.mixture = mixture if isinstance(mixture, Mixture) else load_mixture(mixture)
        self.tokenizer = tokenizer if not isinstance(tokenizer, (str, Path)) else load_tokenizer(tokenizer)
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size, self.seed, self.sft = rank, world_size, seed, sft
        self.on_error = on_error
        # The end of a bad-line error: what the caller's user can do. The trainer's users set
        # no on_error (a run config has none), so the trainer passes its own.
        self.fail_hint = fail_hint
        self.task_names = self.mixture.task_names

        sources: list[TaskSource] = []
        infos: list[TaskInfo] = []
        token_share = self.mixture.uses_abs_weight
        for entry in self.mixture.entries:
            if needs_index(entry):
                raise DataError(
                    f"{self.mixture.source}: task {entry.task_name}: {entry.path} is not indexed yet; "
                    "run the index stage (build_index) and point 'path' at its output"
                )
            dataset = IndexedDataset(entry.path)
            data_bytes = int(dataset.bounds[-1])
            sources.append(
                TaskSource(
                    name=entry.task_name,
                    path=entry.path,
                    transforms=entry.transforms,
                    incontext_weight=tuple(entry.incontext_weight),
                    oversize_rule=entry.oversize_rule or oversize_rule,
                    do_compact=entry.do_compact,
                )
            )
            weight = (entry.abs_weight or 0.0) if token_share else entry.weight * data_bytes
            infos.append(
                TaskInfo(entry.task_name, len(dataset), weight, entry.ave_tokens_per_line or -1.0, entry.allow_repeat)
            )
        self._maker = SampleMaker(sources, self.tokenizer, max_length=max_length, sft=sft, seed=seed)
        self._sampler = MixtureSampler(
            infos, seed=seed, rank=rank, world_size=world_size, max_length=max_length, token_share=token_share
        )
        self.num_workers, self.num_threads = num_workers, num_threads
        # Lines requested ahead per task: `prefetch` chunks (the guide's prefetch_slice, a
        # chunk being this loader's slice) per reader thread of every worker, times
        # prefetch_factor (torch's per-worker depth; packing happens here, not in workers).
        self._lookahead = prefetch * prefetch_factor * max(1, num_workers) * num_threads * CHUNK
        self._prefetch: Prefetcher | None = None
        self._ahead: dict[int, tuple[int, int]] = {}
        # task -> (line, epoch, windows, next window number)
        self._pending: dict[int, tuple[int, int, list[tuple[np.ndarray, np.ndarray]], int]] = {}
        self._carry: tuple[WindowRef, np.ndarray, np.ndarray] | None = None
        self._batches = 0
        self._skipped: dict[str, dict[str, int]] = {name: {} for name in self.task_names}
        self._finished = False
        self.resume_warnings: list[str] = []

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._prefetch is None:
            self._prefetch = Prefetcher(self._maker, self.num_workers, self.num_threads)
            for task in range(len(self.task_names)):
                self._top_up(task)
        rows: list[list[Placed]] = []
        ended = self._finished
        for _ in range(self.batch_size):
            if ended:
                break
            row: list[Placed] = []
            room = self.max_length
            while True:
                item = self._take_window()
                if item is None:
                    ended = True
                    break
                ref, src, tgt = item
                if len(src) > room:
                    self._carry = (ref, src, tgt)
                    break
                row.append((ref[0], src, tgt))
                room -= len(src)
            if row:
                rows.append(row)
        if not rows:
            self._finished = True
            raise StopIteration
        self._finished = ended
        self._batches += 1
        return pack_rows(rows, self.batch_size, self.max_length, self.task_names)

    def _take_window(self) -> tuple[WindowRef, np.ndarray, np.ndarray] | None:
        """The next window of the stream, or None when every task has stopped."""
        if self._carry is not None:
            carried, self._carry = self._carry, None
            return carried
        while True:
            task = self._sampler.choose_task()
            if task is None:
                return None
            pending = self._pending.get(task)
            if pending is None:
                nxt = self._sampler.next_line(task)
                if nxt is None:
                    continue  # the task just stopped; draw again among the others
                line, epoch = nxt
                self._top_up(task)
                assert self._prefetch is not None
                result = self._prefetch.get((task, line, epoch))
                if not self._usable(task, line, result):
                    continue
                pending = (line, epoch, result.windows, 0)
            line, epoch, windows, number = pending
            src, tgt = windows[number]
            if number + 1 < len(windows):
                self._pending[task] = (line, epoch, windows, number + 1)
            else:
                self._pending.pop(task, None)
            self._sampler.observe(task, len(src))
            return (task, line, epoch, number), src, tgt

    def _usable(self, task: int, line: int, result: LineResult) -> bool:
        """Apply the error policy to a line's result; True when it has windows."""
        if result.error is not None:
            if self.on_error == "fail":
                raise DataError(
                    f"{self._maker.where(task, line)}: {result.error}; fix the data or transform, {self.fail_hint}"
                )
            counts = self._skipped[self.task_names[task]]
            counts["error"] = counts.get("error", 0) + 1
            return False
        if not result.windows:
            counts = self._skipped[self.task_names[task]]
            reason = result.dropped or "dropped"
            counts[reason] = counts.get(reason, 0) + 1
            return False
        return True

    def _top_up(self, task: int) -> None:
        """Ask the workers for the task's next lines, keeping `_lookahead` of them requested."""
        if self._prefetch is None or self.num_workers == 0:
            return
        state = self._sampler.cursors[task]
        if not state.alive:
            return
        current = (state.epoch, state.cursor)
        marker = self._ahead.get(task, current)
        if marker < current:
            marker = current
        owned = self._sampler.orders[task].owned
        # at most about one epoch ahead: a tiny repeating task needs no long queue
        limit = min(self._lookahead, max(CHUNK, owned))
        ahead = (marker[0] - current[0]) * owned + marker[1] - current[1]
        if ahead > limit - CHUNK:
            return
        keys, marker = self._sampler.upcoming(task, marker, limit - ahead)
        self._ahead[task] = marker
        self._prefetch.request([(task, line, epoch) for line, epoch in keys])

    # ------------------------------------------------------------------ state

    @property
    def lookahead(self) -> int:
        """Lines the workers are asked to prepare ahead of use, per task (at most one epoch)."""
        return self._lookahead

    def read_ahead(self) -> dict[str, int]:
        """Per task: lines requested from the workers and not yet used (queued, running or done)."""
        counts = dict.fromkeys(self.task_names, 0)
        if self._prefetch is not None:
            for task, _line, _epoch in self._prefetch.held():
                counts[self.task_names[task]] += 1
        return counts

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Per task: lines skipped so far, by reason (errors in skip mode, empty output, too long)."""
        return {name: dict(counts) for name, counts in self._skipped.items() if counts}

    def state_dict(self) -> dict[str, Any]:
        """The data state right after the last batch handed out (small, JSON-serialisable)."""
        sampler = self._sampler.state_dict()
        for task, (line, epoch, _windows, number) in self._pending.items():
            sampler["tasks"][self.task_names[task]]["pending"] = [line, epoch, number]
        carry = None
        if self._carry is not None:
            task, line, epoch, number = self._carry[0]
            carry = [self.task_names[task], line, epoch, number]
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "max_length": self.max_length,
            "sft": self.sft,
            "batches": self._batches,
            "finished": self._finished,
            "sampler": sampler,
            "carry": carry,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (same seed, rank, world_size, max_length, sft)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"dataloader state version {state.get('version')} is not {STATE_VERSION}; cannot resume it")
        for key in ("seed", "rank", "world_size", "max_length", "sft"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"dataloader state was saved with {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                    "use the same setting, or start without the data state (load_dataloader_ckpt off)"
                )
        restarted = self._sampler.load_state_dict(state["sampler"])
        self.resume_warnings = list(restarted.values())
        for message in self.resume_warnings:
            warnings.warn(message, stacklevel=2)
        index = {name: i for i, name in enumerate(self.task_names)}
        self._pending = {}
        for name, entry in state["sampler"]["tasks"].items():
            pending = entry.get("pending")
            task = index.get(name)
            if pending is None or task is None or name in restarted:
                continue
            line, epoch, number = pending
            windows = self._windows(task, line, epoch)
            self._pending[task] = (line, epoch, windows, number)
        self._carry = None
        if state["carry"] is not None:
            name, line, epoch, number = state["carry"]
            if name in index and name not in restarted:
                windows = self._windows(index[name], line, epoch)
                self._carry = ((index[name], line, epoch, number), *windows[number])
        self._batches = int(state["batches"])
        self._finished = bool(state.get("finished", False))
        self._skipped = {name: dict(state.get("skipped", {}).get(name, {})) for name in self.task_names}
        self._ahead = {}
        if self._prefetch is not None:
            for task in range(len(self.task_names)):
                self._top_up(task)

    def _windows(self, task: int, line: int, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        result = self._maker.make(task, line, epoch)
        if not result.windows:
            raise DataError(
                f"{self._maker.where(task, line)}: changed since the state was saved; cannot resume it exactly"
            )
        return result.windows

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop prefetch workers (also done when the loader is garbage-collected)."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
