"""Merge indexed shards into the final index directory.

The index directory holds data.jsonl (the kept input lines, byte for byte, each
ending in \\n), `index` (text, N+1 line bounds starting at 0, one per line),
index.h5 (dataset "index", int64, the same bounds) and meta.json. It is assembled in a
temporary directory next to the output; an existing output is swapped out only when
the new one is complete, and only if it looks like an index (never a user's folder).

Each shard's bytes are copied into place at its final offset with copy_file_range
(in the kernel, no Python buffers), so the copy of several shards can run in
parallel. Run the merge of a Slurm array build as
`python -m fm9g.data.index_merge --plan PLAN.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fm9g.data.errors import DataError, reraise_no_space
from fm9g.data.index_plan import plan_shard_dir, read_plan
from fm9g.data.index_shard import failure_message, load_shard_result
from fm9g.data.index_stats import length_distribute, unit_factor
from fm9g.data.index_temp import make_temp_dir, sweep_stale, temp_prefix
from fm9g.data.index_types import IndexResult, ShardResult
from fm9g.rundir.atomic import fsync_dir, replace_dir, write_json

# (shard_dir, data_path, data_offset, part_path, durable) for one shard's share of the output.
WriteJob = tuple[str, str, int, str, bool]

_INDEX_FILES = {"data.jsonl", "index", "index.h5", "meta.json"}


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy count bytes between file descriptors at the given offsets."""
    while count > 0:
        try:
            done = os.copy_file_range(src, dst, count, src_offset, dst_offset)
        except OSError as error:
            # Older kernels and some network filesystems refuse copy_file_range.
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
            done = 0
        if done == 0:
            chunk = os.pread(src, min(count, 8 << 20), src_offset)
            if not chunk:
                raise DataError("an input file shrank while the index was being written; re-run")
            done = os.pwrite(dst, chunk, dst_offset)
        src_offset += done
        dst_offset += done
        count -= done


def write_shard_part(job: WriteJob) -> None:
    """Copy one shard's kept bytes into data.jsonl at its offset and write its `index` lines.

    With `durable`, the part is flushed here (fdatasync), so the disk writes of early
    shards overlap the indexing of later ones instead of piling up in one final fsync.
    """
    shard_dir, data_path, data_offset, part_path, durable = job
    result = load_shard_result(shard_dir)
    assert result is not None
    bounds = np.load(Path(shard_dir) / "bounds.npy")
    out = os.open(data_path, os.O_WRONLY)
    try:
        position = data_offset
        own = Path(shard_dir) / "data.jsonl"
        for seg in result.segments:
            if not seg.pieces:
                continue
            src = os.open(seg.path, os.O_RDONLY) if any(p[0] == "range" for p in seg.pieces) else -1
            own_fd = os.open(own, os.O_RDONLY) if any(p[0] == "file" for p in seg.pieces) else -1
            try:
                for piece in seg.pieces:
                    if piece[0] == "newline":
                        os.pwrite(out, b"\n", position)
                        position += 1
                        continue
                    _, start, end = piece
                    _copy_range(src if piece[0] == "range" else own_fd, out, start, position, end - start)
                    position += end - start
            finally:
                for fd in (src, own_fd):
                    if fd >= 0:
                        os.close(fd)
        if position - data_offset != result.nbytes:
            raise DataError(f"shard {result.index}: wrote {position - data_offset} bytes, expected {result.nbytes}")
        if durable:
            os.fdatasync(out)
    finally:
        os.close(out)
    text = "\n".join(map(str, (bounds[1:] + data_offset).tolist()))
    Path(part_path).write_text(text + "\n" if text else "", encoding="ascii")


def _looks_like_index(path: Path) -> bool:
    """An empty directory, or one holding only index files."""
    return {p.name for p in path.iterdir()} <= _INDEX_FILES


def check_replaceable(output: Path) -> None:
    """Refuse to overwrite an existing path that is not an index directory."""
    if output.exists() and (not output.is_dir() or not _looks_like_index(output)):
        raise DataError(
            f"{output}: exists and is not an index directory (expected only {', '.join(sorted(_INDEX_FILES))}); "
            "choose a new output path or remove it yourself"
        )


def install_dir(tmp: Path, output: Path) -> None:
    """Move the complete `tmp` to `output`, replacing an older index only at the very end."""
    check_replaceable(output)
    if output.exists():
        old = output.parent / f"{temp_prefix(output.name, 'old')}{os.urandom(4).hex()}"
        os.replace(output, old)
        try:
            replace_dir(tmp, output)
        except BaseException:
            os.replace(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        replace_dir(tmp, output)
    fsync_dir(output.parent)


def _global_lines(results: list[ShardResult]) -> list[list[int]]:
    """For each shard and segment, the number of source lines of its file before it."""
    seen: dict[str, int] = {}
    out: list[list[int]] = []
    for result in results:
        row = []
        for seg in result.segments:
            row.append(seen.get(seg.path, 0))
            seen[seg.path] = seen.get(seg.path, 0) + seg.source_lines
        out.append(row)
    return out


def raise_first_failure(results: Sequence[ShardResult | None]) -> None:
    """Raise the DataError of the first failed shard in input order (fail mode)."""
    done = [r for r in results if r is not None]
    before = _global_lines(done)
    for result, offsets in zip(done, before):
        if result.failure is not None:
            failed = result.failure
            seg = result.segments[failed["segment"]]
            line = failed["line"] + offsets[failed["segment"]] if failed["line"] > 0 else 0
            raise DataError(failure_message(seg.path, line, failed["kind"], failed["message"]))


def _check_sources(result: ShardResult) -> None:
    """Refuse to copy byte ranges of an input that changed since its shard was indexed."""
    for seg in result.segments:
        if any(p[0] == "range" for p in seg.pieces):
            stat = os.stat(seg.path)
            if (stat.st_size, stat.st_mtime_ns) != (seg.size, seg.mtime_ns):
                raise DataError(f"{seg.path}: changed after it was indexed; run the index again")


class OutputBuilder:
    """One index directory under construction in a temporary directory next to the output.

    Shards are `place`d in input order as soon as they are known (each gets the next
    offset in data.jsonl and a write job that may run anywhere, in parallel); `finish`
    writes `index`, index.h5 and meta.json and moves the directory into place.
    """

    def __init__(self, output: str | Path, durable: bool = True) -> None:
        self.output = Path(output).absolute()
        self.durable = durable
        check_replaceable(self.output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.swept = sweep_stale(self.output.parent, self.output.name)  # what killed builds left here
        # shared: this folder becomes the output, which others read (mkdtemp alone gives 0700).
        self.tmp = make_temp_dir(self.output.parent, self.output.name, "tmp", shared=True)
        self.data_path = self.tmp / "data.jsonl"
        self.data_path.touch()
        self.offsets = [0]
        self.dirs: list[Path] = []

    def place(self, shard_dir: str | Path, result: ShardResult) -> WriteJob:
        """Reserve the next range of data.jsonl for a shard; return its write job."""
        _check_sources(result)
        number = len(self.dirs)
        job = (
            str(shard_dir),
            str(self.data_path),
            self.offsets[-1],
            str(self.tmp / f"index.part{number}"),
            self.durable,
        )
        self.dirs.append(Path(shard_dir))
        self.offsets.append(self.offsets[-1] + result.nbytes)
        return job

    def finish(self, results: list[ShardResult], shards_cached: int = 0) -> IndexResult:
        """Complete the directory once every placed shard's write job has run; install it."""
        if len(results) != len(self.dirs) or not results:
            raise DataError(f"{self.output}: {len(self.dirs)} of {len(results)} shards were written; cannot finish")
        methods = {(r.method, r.language) for r in results}
        if len(methods) != 1:
            raise DataError(f"shards were indexed with different settings {sorted(methods)}; re-plan and re-run")
        method, language = methods.pop()
        nlines = sum(r.nlines for r in results)
        errors, examples = _error_report(results)
        warnings, warning_examples = _warning_report(results)
        skipped = sum(sum(kinds.values()) for kinds in errors.values())
        if nlines == 0:
            detail = f" ({skipped} bad lines skipped)" if skipped else ""
            raise DataError(f"{self.output}: no valid lines in the inputs{detail}; nothing to index")
        if self.data_path.stat().st_size != self.offsets[-1]:
            raise DataError(f"{self.data_path}: has {self.data_path.stat().st_size} bytes, expected {self.offsets[-1]}")
        with open(self.tmp / "index", "wb") as index:
            index.write(b"0\n")
            for number in range(len(self.dirs)):
                part = self.tmp / f"index.part{number}"
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, index, 1 << 20)
                os.unlink(part)
            if self.durable:
                os.fsync(index.fileno())
        bounds = np.concatenate(
            [np.zeros(1, dtype=np.int64)]
            + [np.load(d / "bounds.npy")[1:] + self.offsets[k] for k, d in enumerate(self.dirs)]
        )
        with h5py.File(self.tmp / "index.h5", "w") as h5:
            h5.create_dataset("index", data=bounds)
        if self.durable:
            for name in ("data.jsonl", "index.h5"):
                fd = os.open(self.tmp / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        buckets = np.sum([r.buckets for r in results], axis=0)
        meta: dict[str, Any] = {
            "language": language,
            "nlines": nlines,
            "nbytes": int(self.offsets[-1]),
            "length_distribute": length_distribute(buckets),
            "avg_token_per_line": unit_factor(method) * sum(r.units for r in results) / nlines,
            # Kept for readers of the old format; nothing is uploaded to HDFS.
            "hdfs_path": None,
            "data_sample": next((r.sample for r in results if r.sample is not None), None),
            "token_count_method": method,
            "errors": errors,
            "skipped_lines": skipped,
            "warnings": warnings,
            "sources": list(dict.fromkeys(seg.path for r in results for seg in r.segments)),
        }
        write_json(self.tmp / "meta.json", meta)
        install_dir(self.tmp, self.output)
        return IndexResult(
            output=self.output,
            nlines=nlines,
            nbytes=int(meta["nbytes"]),
            meta=meta,
            errors=errors,
            skipped_lines=skipped,
            examples=examples,
            shards_total=len(results),
            shards_cached=shards_cached,
            warnings=warnings,
            warning_examples=warning_examples,
        )

    def abort(self) -> None:
        """Remove the unfinished directory."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _error_report(results: list[ShardResult]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per-file error counts and the first bad-line examples with file-global line numbers."""
    errors: dict[str, dict[str, int]] = {}
    examples: list[str] = []
    for result, offsets in zip(results, _global_lines(results)):
        for seg, offset in zip(result.segments, offsets):
            for kind, count in seg.errors.items():
                per_file = errors.setdefault(seg.path, {})
                per_file[kind] = per_file.get(kind, 0) + count
            for line, kind, message in seg.examples:
                if len(examples) < 20:
                    where = f"{seg.path}:{line + offset}" if line > 0 else seg.path
                    examples.append(f"{where}: {kind}: {message}")
    return errors, examples


def _warning_report(results: list[ShardResult]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per-file warning counts and each file's first suspect line (file-global number)."""
    warnings: dict[str, dict[str, int]] = {}
    first: dict[str, str] = {}
    for result, offsets in zip(results, _global_lines(results)):
        for seg, offset in zip(result.segments, offsets):
            for kind, count in seg.warnings.items():
                per_file = warnings.setdefault(seg.path, {})
                per_file[kind] = per_file.get(kind, 0) + count
            if seg.first_warning_line and seg.path not in first:
                kinds = ", ".join(sorted(seg.warnings))
                first[seg.path] = f"{seg.path}:{seg.first_warning_line + offset}: {kinds}"
    return warnings, list(first.values())


def merge_shards(
    shard_dirs: Sequence[str | Path],
    output: str | Path,
    *,
    durable: bool = True,
    shards_cached: int = 0,
) -> IndexResult:
    """Assemble the index directory `output` from finished shard results, in the given order."""
    dirs = [Path(d) for d in shard_dirs]
    results: list[ShardResult] = []
    for number, directory in enumerate(dirs):
        result = load_shard_result(directory)
        if result is None:
            raise DataError(f"shard {number} ({directory}) has no result; run its index_shard task first")
        results.append(result)
    raise_first_failure(results)
    if not results:
        raise DataError("no shards to merge")
    builder = OutputBuilder(output, durable)
    try:
        for job in [builder.place(d, r) for d, r in zip(dirs, results)]:
            write_shard_part(job)
        return builder.finish(results, shards_cached)
    except BaseException:
        builder.abort()
        raise


def main(argv: list[str] | None = None) -> int:
    """Slurm entry point: merge every shard of --plan into the plan's output."""
    parser = argparse.ArgumentParser(prog="python -m fm9g.data.index_merge", description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, type=Path, help="PLAN.json written by plan_shards")
    args = parser.parse_args(argv)
    try:
        plan = read_plan(args.plan)
        dirs = [plan_shard_dir(plan, k) for k in range(len(plan["shards"]))]
        with reraise_no_space(plan["output"]):
            result = merge_shards(dirs, plan["output"])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"indexed {result.nlines} lines ({result.nbytes} bytes) into {result.output}")
    with contextlib.suppress(Exception):
        for line in result.examples:
            print(f"skipped {line}")
        for line in result.warning_examples:
            print(f"warning: kept {line} (strict JSON parsers reject raw control characters in strings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
