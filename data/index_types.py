"""The records that travel between planning, shard indexing and merging.

Everything here is a plain dataclass with a JSON form, because the same records are
written to PLAN.json and to each shard's result.json and read back by other
processes (a Slurm array task per shard, then one merge task).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fm9g.data.errors import DataError

OnError = Literal["fail", "skip"]
Language = Literal["zh", "en", "code"]
SourceKind = Literal["jsonl", "txt"]

# Bumped whenever the shard result layout or the statistics change, so stale cached
# shard results are never reused.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Segment:
    """A byte range [start, end) of one input file, cut at line boundaries."""

    path: str
    kind: SourceKind
    start: int
    end: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardSpec:
    """One unit of indexing work: consecutive segments of the inputs, in input order."""

    index: int
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        """Input bytes covered by this shard."""
        return sum(segment.end - segment.start for segment in self.segments)

    def to_json(self) -> dict[str, Any]:
        """JSON form (PLAN.json, result.json)."""
        return {"index": self.index, "segments": [dataclasses.asdict(s) for s in self.segments]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ShardSpec:
        """Inverse of `to_json`."""
        return cls(index=int(raw["index"]), segments=tuple(Segment(**s) for s in raw["segments"]))


def validate_options(language: str, on_error: str, processes: int) -> None:
    """Reject unknown languages, error policies and process counts up front."""
    languages = get_args(Language)
    if language not in languages:
        raise DataError(f"language must be one of {', '.join(languages)} (got {language!r})")
    if on_error not in get_args(OnError):
        raise DataError(f"on_error must be 'fail' or 'skip' (got {on_error!r})")
    if processes < 1:
        raise DataError(f"processes must be at least 1 (got {processes})")


@dataclass(frozen=True)
class IndexOptions:
    """What every shard of one build shares."""

    language: Language = "zh"
    tokenizer: str | None = None
    tokenizer_sha1: str | None = None
    on_error: OnError = "fail"

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


@dataclass
class SegmentResult:
    """What indexing one segment found: lines, errors and where its kept bytes are.

    `pieces` lists the output bytes in order: ["range", start, end] copies that range
    of the source file, ["file", start, end] that range of the shard's own data.jsonl
    (converted .txt input), ["newline"] a single b"\\n" (a last line without one).
    """

    path: str
    start: int
    end: int
    size: int
    mtime_ns: int
    source_lines: int = 0
    kept_lines: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    examples: list[list[Any]] = field(default_factory=list)  # [local line, kind, message]
    # Kept lines worth a warning ({kind: count}) and the first such local line.
    warnings: dict[str, int] = field(default_factory=dict)
    first_warning_line: int = 0
    pieces: list[list[Any]] = field(default_factory=list)


@dataclass
class ShardResult:
    """The result.json of one indexed shard (plus bounds.npy beside it)."""

    index: int
    key: str
    method: str
    language: str = "zh"
    nlines: int = 0
    nbytes: int = 0
    units: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * 8)
    sample: Any = None
    segments: list[SegmentResult] = field(default_factory=list)
    # {"segment": i, "line": local line, "kind": ..., "message": ...} in fail mode.
    failure: dict[str, Any] | None = None
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ShardResult:
        """Inverse of `to_json`."""
        data = dict(raw)
        data["segments"] = [SegmentResult(**s) for s in data.get("segments", [])]
        return cls(**data)


@dataclass
class IndexResult:
    """What `build_index` / `merge_shards` produced."""

    output: Path
    nlines: int
    nbytes: int
    meta: dict[str, Any]
    # per input file: {error kind: count}; only files with errors appear
    errors: dict[str, dict[str, int]]
    skipped_lines: int
    # "file:line: message" for the first few bad lines (skip mode)
    examples: list[str]
    shards_total: int = 0
    shards_cached: int = 0
    # Stale temporary folders of killed earlier builds that this build removed (index_temp).
    stale_removed: list[str] = field(default_factory=list)
    stale_bytes: int = 0
    # per input file: {warning kind: count} for lines kept but suspect (raw control characters)
    warnings: dict[str, dict[str, int]] = field(default_factory=dict)
    # "file:line: kind" of the first suspect line of each file
    warning_examples: list[str] = field(default_factory=list)
