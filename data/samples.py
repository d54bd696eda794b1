"""Turn one line of one task into training windows: read, transform, tokenize, apply the oversize rule.

A window is (src, tgt) of equal length: src = BOS + input + output, tgt = the token
that follows each src position, with -100 wherever that next token is part of the
input, and EOS after the last output token (targets are pre-shifted; the loss covers
the output tokens and the final EOS). In SFT mode the input is wrapped as
`<用户>{input}<AI>`, unless it already holds `<用户>` (the guide's data form; see
`chat_prompt`).

`SampleMaker.make(task, line, epoch)` is a pure function of its arguments (the
transform gets a `random.Random` seeded from seed, task, epoch and line), so the
loader can compute it in any process, ahead of time or again after a resume, and get
the same windows. Problems with a line are returned as a `LineResult` with `error`
set rather than raised, so the loader applies its on_error policy in stream order.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fm9g.data.errors import DataError
from fm9g.data.index_check import decode_json
from fm9g.data.reader import IndexedDataset
from fm9g.data.tokenizer import CHAT_MARKERS, Tokenizer
from fm9g.data.transforms import TransformFn, load_transform

OversizeRule = Literal["drop", "head", "segment"]
IGNORE = -100
# A trailing window of a segmented document shorter than this is dropped (original rule).
MIN_TAIL_WINDOW = 9
# The FM9G chat markers: `<用户>{question}<AI>{answer}`.
USER_MARKER, AI_MARKER = CHAT_MARKERS


@dataclass(frozen=True)
class TaskSource:
    """What a worker needs to produce one task's samples (picklable)."""

    name: str
    path: str
    transforms: str | None
    incontext_weight: tuple[float, ...]
    oversize_rule: OversizeRule
    do_compact: bool


@dataclass
class LineResult:
    """The windows of one line; `error` set when the line could not be used."""

    windows: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    error: str | None = None
    dropped: str | None = None  # why a valid line produced no window (empty output, too long)


def make_windows(
    bos: int,
    eos: int,
    input_ids: list[int],
    output_ids: list[int],
    *,
    max_length: int,
    rule: OversizeRule,
    do_compact: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str | None]:
    """The (src, tgt) windows of one sample under an oversize rule; (windows, reason if none)."""
    if input_ids and len(input_ids) >= max_length - 2:
        return [], "input_too_long"  # nothing of the answer would fit (original rule)
    if input_ids and do_compact and 1 + len(input_ids) + len(output_ids) > max_length and rule != "drop":
        # keep the input's head and tail halves so that part of the answer still fits
        budget = max(max_length // 2, max_length - 1 - len(output_ids))
        if budget < len(input_ids):
            half = budget // 2
            input_ids = input_ids[:half] + input_ids[len(input_ids) - (budget - half) :]
    src = np.array([bos, *input_ids, *output_ids], dtype=np.int64)
    tgt = np.array([IGNORE] * len(input_ids) + [*output_ids, eos], dtype=np.int64)
    if len(src) <= max_length:
        return [(src, tgt)], None
    if rule == "drop":
        return [], "oversize_dropped"
    if rule == "head" or input_ids:
        # instruction data is never split: its answer needs the prompt in the same window
        return [(src[:max_length], tgt[:max_length])], None
    windows = []
    for start in range(0, len(src), max_length):
        window = (src[start : start + max_length], tgt[start : start + max_length])
        if start > 0 and len(window[0]) < MIN_TAIL_WINDOW:
            break
        windows.append(window)
    return windows, None


def chat_prompt(given: str) -> str:
    """The SFT prompt of an `input`: `<用户>{input}<AI>`, unless it is already in that form.

    The guide's own data keeps the markers inside `input` (its meta.json `data_sample`:
    "<用户>For a car, ..."), so an input holding `<用户>` is taken as formatted; only the
    `<AI>` that must precede the answer is added when it does not already end with it."""
    if USER_MARKER not in given:
        return f"{USER_MARKER}{given}{AI_MARKER}"
    return given if given.rstrip().endswith(AI_MARKER) else given + AI_MARKER


def _incontext_index(weights: tuple[float, ...], rng: random.Random) -> int:
    """num_sample for transform: an index drawn from the normalised incontext_weight."""
    if len(weights) <= 1:
        return 0
    point = rng.random() * sum(weights)
    for index, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return index
    return len(weights) - 1


class SampleMaker:
    """Produces `LineResult`s for (task, line, epoch); opens datasets and transforms lazily."""

    def __init__(self, tasks: list[TaskSource], tokenizer: Tokenizer, *, max_length: int, sft: bool, seed: int) -> None:
        self.tasks = tasks
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.sft = sft
        self.seed = seed
        self._datasets: dict[int, IndexedDataset] = {}
        self._transforms: dict[int, TransformFn | None] = {}
        # A worker's reader threads share this maker: open each dataset and run each
        # transform script once per process, not once per thread that races to it.
        self._opening = threading.Lock()

    def dataset(self, task: int) -> IndexedDataset:
        """The task's IndexedDataset (opened once per process)."""
        if task not in self._datasets:
            with self._opening:
                if task not in self._datasets:
                    self._datasets[task] = IndexedDataset(self.tasks[task].path)
        return self._datasets[task]

    def _transform(self, task: int) -> TransformFn | None:
        if task not in self._transforms:
            with self._opening:
                if task not in self._transforms:
                    script = self.tasks[task].transforms
                    name = f"task {self.tasks[task].name}"
                    self._transforms[task] = load_transform(script, name) if script else None
        return self._transforms[task]

    def where(self, task: int, line: int) -> str:
        """`task NAME, <path>/data.jsonl:<line>` for messages."""
        return f"task {self.tasks[task].name}, {Path(self.tasks[task].path) / 'data.jsonl'}:{line + 1}"

    def make(self, task: int, line: int, epoch: int) -> LineResult:
        """The windows of line `line` of task `task` in epoch `epoch`."""
        source = self.tasks[task]
        try:
            raw = self.dataset(task)[line]
            data = decode_json(raw)
        except (ValueError, UnicodeDecodeError) as error:
            return LineResult(error=f"not valid JSON ({error})")
        if not isinstance(data, dict):
            return LineResult(error=f"the line is a JSON {type(data).__name__}, not an object")
        transform = self._transform(task)
        if transform is not None:
            # String seeds hash with sha512: the same in every process, unlike hash().
            rng = random.Random(f"{self.seed}:{source.name}:{epoch}:{line}")
            try:
                data = transform(data, _incontext_index(source.incontext_weight, rng), rng)
            except Exception as error:  # the user's code: report whatever it raises
                return LineResult(error=f"transform raised {type(error).__name__}: {error}")
            if not isinstance(data, dict):
                return LineResult(error=f"transform returned {type(data).__name__}, not a dict with input/output")
        output = data.get("output")
        given = data.get("input")
        if (output is not None and not isinstance(output, str)) or (given is not None and not isinstance(given, str)):
            return LineResult(error='"input" and "output" must be strings')
        if not output:
            return LineResult(dropped="empty_output")
        prompt = chat_prompt(given or "") if self.sft else (given or "")
        try:
            input_ids = self.tokenizer.encode(prompt) if prompt else []
            output_ids = self.tokenizer.encode(output)
        except Exception as error:  # e.g. lone surrogates the tokenizer cannot encode
            return LineResult(error=f"tokenizer failed: {type(error).__name__}: {error}")
        windows, reason = make_windows(
            self.tokenizer.bos_id,
            self.tokenizer.eos_id,
            input_ids,
            output_ids,
            max_length=self.max_length,
            rule=source.oversize_rule,
            do_compact=source.do_compact,
        )
        return LineResult(windows=windows, dropped=reason)

    def make_many(self, keys: list[tuple[int, int, int]]) -> list[LineResult]:
        """`make` for each (task, line, epoch)."""
        return [self.make(*key) for key in keys]

    def __getstate__(self) -> dict[str, Any]:
        # Opened datasets and loaded transform modules stay in their process.
        state = dict(self.__dict__)
        state["_datasets"] = {}
        state["_transforms"] = {}
        del state["_opening"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opening = threading.Lock()


__all__ = ["DataError", "LineResult", "SampleMaker", "TaskSource", "chat_prompt", "make_windows"]
