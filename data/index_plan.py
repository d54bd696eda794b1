"""Plan an index build: find the input files and cut them into shards at line boundaries.

The inputs (jsonl/txt files, or directories searched recursively for *.jsonl and
*.txt, sorted) are treated as one stream in input order; shards are consecutive
pieces of that stream, so concatenating the shards' outputs in order reproduces the
inputs in order. A large file is cut at the first line start at or after each target
offset; small files are grouped into one shard.

Each shard has a cache key: sha1 of the shard's segments (absolute path, size,
mtime_ns, byte range, kind), the indexing options and the tokenizer file's sha1. Keying
on size+mtime instead of the bytes keeps planning O(files) rather than O(bytes); a
rewritten file gets a new mtime and so a new key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fm9g.data.errors import DataError
from fm9g.data.index_types import FORMAT_VERSION, IndexOptions, Segment, ShardSpec, validate_options
from fm9g.rundir.atomic import read_json, write_json

_SUFFIXES = {".jsonl": "jsonl", ".txt": "txt"}


def collect_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The input files, in order: files as given, directories' *.jsonl/*.txt sorted."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise DataError("no inputs given to index")
    files: list[Path] = []
    for item in items:
        path = Path(item).absolute()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in _SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"{path}: no .jsonl or .txt files in this directory")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in _SUFFIXES:
                raise DataError(f"{path}: only .jsonl and .txt files can be indexed (got {path.suffix or 'no suffix'})")
            files.append(path)
        else:
            raise DataError(f"{path}: input does not exist")
    if len(set(files)) != len(files):
        raise DataError("the same input file is listed twice")
    return files


def check_output(files: list[Path], inputs: str | Path | Sequence[str | Path], output: Path) -> None:
    """Refuse an output that is an input, lies inside an input directory, or contains an input."""
    out = output.absolute()
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    for item in items:
        source = Path(item).absolute()
        if out == source or (source.is_dir() and source in out.parents):
            raise DataError(f"{output}: the index output must differ from (and not lie inside) the input {source}")
    for file in files:
        if out in file.parents:
            raise DataError(f"{output}: the index output contains the input {file}; choose another output directory")


def _next_line_start(path: Path, offset: int, size: int) -> int:
    """The first line start at or after `offset` (the file size when none is left)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    with open(path, "rb") as handle:
        handle.seek(offset - 1)
        position = offset - 1
        while True:
            chunk = handle.read(1 << 16)
            if not chunk:
                return size
            found = chunk.find(b"\n")
            if found >= 0:
                return position + found + 1
            position += len(chunk)


def split_shards(files: list[Path], n_shards: int) -> list[ShardSpec]:
    """Cut the files into about `n_shards` shards of similar byte size.

    Each file is cut on its own into round(size / target) pieces at line boundaries
    (cut k at the first line start at or after k/m of the file), and runs of whole
    small files are grouped up to the target size. Cuts depend only on the file itself
    and the target, so fixing one file (say, a bad line reported in fail mode) leaves
    the other files' shards, and their cached results, as they were.
    """
    stats = [(path, path.stat()) for path in files]
    total = sum(stat.st_size for _, stat in stats)
    target = max(1, total // max(1, n_shards))
    shards: list[list[Segment]] = []
    group: list[Segment] = []
    group_bytes = 0
    for path, stat in stats:
        kind = _SUFFIXES[path.suffix]
        size = stat.st_size
        pieces = max(1, round(size / target))
        if pieces == 1:
            if group and group_bytes + size > target:
                shards.append(group)
                group, group_bytes = [], 0
            group.append(Segment(str(path), kind, 0, size, size, stat.st_mtime_ns))  # type: ignore[arg-type]
            group_bytes += size
            continue
        if group:
            shards.append(group)
            group, group_bytes = [], 0
        cuts = [0]
        for k in range(1, pieces):
            cut = _next_line_start(path, k * size // pieces, size)
            if cuts[-1] < cut < size:
                cuts.append(cut)
        cuts.append(size)
        for start, end in zip(cuts, cuts[1:]):
            shards.append([Segment(str(path), kind, start, end, size, stat.st_mtime_ns)])  # type: ignore[arg-type]
    if group:
        shards.append(group)
    return [ShardSpec(index, tuple(segs)) for index, segs in enumerate(shards)]


def tokenizer_identity(tokenizer: str | Path | object | None) -> tuple[str | None, str | None]:
    """(absolute path, sha1 of the file) of a tokenizer given as a path or a loaded tokenizer."""
    if tokenizer is None:
        return None, None
    path = getattr(tokenizer, "path", tokenizer)
    if not isinstance(path, (str, os.PathLike)):
        raise DataError("tokenizer must be a path to tokenizer.model / vocab.txt (or a tokenizer loaded from one)")
    from fm9g.data.tokenizer import load_tokenizer  # deferred: sentencepiece import is not free

    file = Path(path).absolute()
    loaded = load_tokenizer(file)  # validates it, and resolves a directory to its file
    real = Path(getattr(loaded, "path", file)).absolute()
    return str(real), hashlib.sha1(real.read_bytes()).hexdigest()


def shard_key(shard: ShardSpec, options: IndexOptions) -> str:
    """Cache key of a shard's result (see the module docstring)."""
    payload = {
        "version": FORMAT_VERSION,
        "segments": [[s.path, s.kind, s.start, s.end, s.size, s.mtime_ns] for s in shard.segments],
        "language": options.language,
        "tokenizer": options.tokenizer_sha1,
        "on_error": options.on_error,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def choose_shard_count(total_bytes: int, processes: int) -> int:
    """Shards for a local build: at least two per process, about 16 MiB each, none under 4 MiB.

    Several shards per process keep processes busy to the end, let the copy and flush
    of finished shards overlap the indexing of later ones, and make the cache useful
    after an interruption.
    """
    count = max(2 * processes, math.ceil(total_bytes / (16 << 20)))
    return max(1, min(count, total_bytes // (4 << 20)))


def plan_shards(
    inputs: str | Path | Sequence[str | Path],
    n_shards: int,
    work_dir: str | Path,
    *,
    output: str | Path | None = None,
    language: str = "zh",
    tokenizer: str | Path | None = None,
    on_error: str = "fail",
) -> Path:
    """Write PLAN.json for a Slurm array build (one task per shard) and return its path.

    The Slurm array size is len(plan["shards"]): about n_shards (files are cut on their
    own, so rounding can add a few). Shard results go to `<work_dir>/shards/<key>/`,
    which doubles as the cache: a task whose result is already there returns at once.
    `output` defaults to `<work_dir>/index`.
    """
    work = Path(work_dir).absolute()
    out = Path(output).absolute() if output is not None else work / "index"
    validate_options(language, on_error, 1)
    files = collect_inputs(inputs)
    check_output(files, inputs, out)
    tok_path, tok_sha = tokenizer_identity(tokenizer)
    options = IndexOptions(language=language, tokenizer=tok_path, tokenizer_sha1=tok_sha, on_error=on_error)  # type: ignore[arg-type]
    shards = split_shards(files, max(1, n_shards))
    plan = {
        "version": FORMAT_VERSION,
        "output": str(out),
        "work_dir": str(work),
        "options": options.to_json(),
        "total_bytes": sum(shard.nbytes for shard in shards),
        "shards": [dict(shard.to_json(), key=shard_key(shard, options)) for shard in shards],
    }
    return write_json(work / "PLAN.json", plan)


def read_plan(path: str | Path) -> dict[str, Any]:
    """Load a PLAN.json written by `plan_shards`."""
    plan = read_json(path)
    if not isinstance(plan, dict) or plan.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a PLAN.json of this version; re-run plan_shards")
    return plan


def plan_shard_dir(plan: dict[str, Any], task_id: int) -> Path:
    """Where shard `task_id` of a plan keeps its result."""
    return Path(plan["work_dir"]) / "shards" / plan["shards"][task_id]["key"]
