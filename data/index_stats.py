"""Token statistics of indexed lines: the estimate rules, length buckets, the data sample.

Without a tokenizer the counts follow the original convert_json2index.py estimate:
`zh` = 0.7 × characters of the raw line (keys, quotes, escapes and the newline
included); `en` and `code` = 1.5 × the pieces of the raw line split on single spaces.
With a tokenizer a line counts len(encode(input)) + len(encode(output)) (content
tokens, no BOS/EOS). Counts are kept as integer "units" (characters, pieces or tokens)
so shard results add up exactly; the factor is applied once at the end.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fm9g.data.index_types import Language
from fm9g.data.tokenizer import Tokenizer, encode_many

BUCKET_NAMES = ("less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k")
# Decimal thousands, lower bound inclusive (as the original script).
BUCKET_BOUNDS = np.array([4000, 8000, 16000, 32000, 64000, 128000, 256000], dtype=np.float64)


def count_method(language: Language, tokenizer: object | None) -> str:
    """The `token_count_method` recorded in meta.json."""
    if tokenizer is not None:
        return "tokenizer"
    return "estimate-zh-0.7char" if language == "zh" else "estimate-en-1.5words"


def unit_factor(method: str) -> float:
    """Tokens per counted unit for a method."""
    return {"tokenizer": 1.0, "estimate-zh-0.7char": 0.7, "estimate-en-1.5words": 1.5}[method]


def bucket_counts(estimates: np.ndarray) -> np.ndarray:
    """Histogram of per-line token estimates over the eight length buckets."""
    index = np.searchsorted(BUCKET_BOUNDS, estimates, side="right")
    return np.bincount(index, minlength=len(BUCKET_NAMES)).astype(np.int64)


class LineCounter:
    """Counts units and buckets for blocks of lines under one method."""

    def __init__(self, method: str, tokenizer: Tokenizer | None = None) -> None:
        self.method = method
        self.factor = unit_factor(method)
        self.tokenizer = tokenizer
        # A line shorter than this many bytes cannot reach the first bucket bound:
        # characters and space-pieces are both at most bytes + 1.
        self._long = int(BUCKET_BOUNDS[0] / self.factor) - 1

    def count_line(self, raw: bytes) -> int:
        """Units of one raw line (with its newline)."""
        if self.method == "estimate-zh-0.7char":
            return len(raw.decode("utf-8"))
        return raw.count(b" ") + 1

    def count_block(
        self, block: bytes, starts: list[int], ends: list[int], objects: list[Any], kept: list[int] | None
    ) -> tuple[int, np.ndarray]:
        """(units, bucket counts) of the kept lines block[starts[i]:ends[i]+1] (None: all).

        `ends[i]` is the position of the line's newline; for a final line without one
        it equals len(block) and the newline the index will add is counted too.
        """
        if self.method == "tokenizer":
            return self._count_tokens(objects, kept)
        lines = range(len(starts)) if kept is None else kept
        if kept is None and starts:
            # The whole block is kept: count it in one vectorised pass.
            stop = min(ends[-1] + 1, len(block))
            added_newline = 1 if ends[-1] >= len(block) else 0
            if self.method == "estimate-zh-0.7char":
                view = np.frombuffer(block, dtype=np.int8, count=stop - starts[0], offset=starts[0])
                # UTF-8 continuation bytes are 0x80..0xBF, i.e. int8 values below -64.
                total = int(np.count_nonzero(view >= -64)) + added_newline
            else:
                total = block.count(b" ", starts[0], stop) + len(starts)
        else:
            total = 0
            for i in lines:
                total += self.count_line(block[starts[i] : ends[i]] + b"\n")
        # Only lines long enough to reach 4k tokens need an exact per-line count.
        lengths = np.asarray(ends, dtype=np.int64) - np.asarray(starts, dtype=np.int64) + 1
        if kept is not None:
            keep = np.asarray(kept, dtype=np.int64)
            candidates = keep[lengths[keep] >= self._long] if len(keep) else keep
        else:
            candidates = np.flatnonzero(lengths >= self._long)
        long_units = [self.count_line(block[starts[i] : ends[i]] + b"\n") for i in candidates.tolist()]
        buckets = bucket_counts(np.array(long_units, dtype=np.float64) * self.factor)
        buckets[0] += len(lines) - len(long_units)
        return total, buckets

    def _count_tokens(self, objects: list[Any], kept: list[int] | None) -> tuple[int, np.ndarray]:
        assert self.tokenizer is not None
        rows = objects if kept is None else [objects[i] for i in kept]
        inputs = encode_many(self.tokenizer, [row.get("input") or "" for row in rows])
        outputs = encode_many(self.tokenizer, [row["output"] for row in rows])
        lengths = np.fromiter((len(a) + len(b) for a, b in zip(inputs, outputs)), dtype=np.float64, count=len(rows))
        return int(lengths.sum()), bucket_counts(lengths)


def shrink_sample(value: Any, limit: int = 50) -> Any:
    """The meta.json `data_sample` form of a line: long strings cut, lists cut to one item.

    Strings longer than `limit` become their first `limit` characters + "..."; a string
    that itself holds a JSON object or array is shrunk recursively and re-serialised.
    """
    if isinstance(value, dict):
        return {key: shrink_sample(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [shrink_sample(item, limit) for item in value[:1]]
    if isinstance(value, str):
        stripped = value.lstrip()
        if stripped[:1] in ("{", "["):
            try:
                inner = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                inner = None
            if isinstance(inner, (dict, list)):
                return json.dumps(shrink_sample(inner, limit), ensure_ascii=False)
        return value[:limit] + "..." if len(value) > limit else value
    return value


def length_distribute(buckets: np.ndarray | list[int]) -> dict[str, int]:
    """The meta.json `length_distribute` mapping."""
    return {name: int(count) for name, count in zip(BUCKET_NAMES, buckets)}
