"""Index one shard: validate its lines, count tokens, record bounds and kept byte ranges.

A shard's result directory holds result.json (`ShardResult`), bounds.npy (the int64
line bounds of the shard's output bytes, N+1 values starting at 0) and, for .txt
input only, the converted jsonl lines in data.jsonl. Clean jsonl input is never
copied here: its output is described as byte ranges of the source file, copied once
by the merge. The directory is built under a temporary name and renamed when
complete, so an interrupted shard leaves nothing that looks finished.

Run as a Slurm array task: `python -m fm9g.data.index_shard --plan PLAN.json --task-id K`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fm9g.data.errors import DataError, reraise_no_space
from fm9g.data.index_check import FIX_HINT, WARNING_CONTROL, check_lines
from fm9g.data.index_plan import plan_shard_dir, read_plan
from fm9g.data.index_stats import LineCounter, count_method, shrink_sample
from fm9g.data.index_temp import make_temp_dir, sweep_stale
from fm9g.data.index_types import FORMAT_VERSION, IndexOptions, SegmentResult, ShardResult, ShardSpec
from fm9g.data.txt2jsonl import txt_line_to_jsonl
from fm9g.rundir.atomic import read_json, write_json

# Bytes read per step: big enough that per-block numpy/msgspec calls amortise, small
# enough that a few processes stay well within memory.
BLOCK_BYTES = 8 << 20
# Bad-line examples kept per segment for the report.
MAX_EXAMPLES = 10


class ShardAborted(Exception):
    """Raised inside a shard when an earlier shard failed in fail mode."""


def load_shard_result(out_dir: str | Path) -> ShardResult | None:
    """The finished result in `out_dir`, or None when there is none (or it is stale)."""
    raw = read_json(Path(out_dir) / "result.json")
    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
        return None
    return ShardResult.from_json(raw)


class _ShardState:
    """Accumulates one shard's output while its segments are scanned."""

    def __init__(self, counter: LineCounter, on_error: str, data_file: Path) -> None:
        self.counter = counter
        self.on_error = on_error
        self.lengths: list[np.ndarray] = []
        self.units = 0
        self.buckets = np.zeros(8, dtype=np.int64)
        self.sample: Any = None
        self.failure: dict[str, Any] | None = None
        self.data_file = data_file
        self.data_handle: Any = None
        self.data_size = 0

    def write_data(self, payload: bytes) -> tuple[int, int]:
        """Append converted lines to the shard's own data.jsonl; return their range."""
        if self.data_handle is None:
            self.data_handle = open(self.data_file, "wb")
        start = self.data_size
        self.data_handle.write(payload)
        self.data_size += len(payload)
        return start, self.data_size

    def add_block(
        self,
        block: bytes,
        starts: list[int],
        ends: list[int],
        objects: list[Any],
        kept: list[int] | None,
    ) -> None:
        """Add the statistics and line lengths of the kept lines of a block."""
        count = len(starts) if kept is None else len(kept)
        if count == 0:
            return
        units, buckets = self.counter.count_block(block, starts, ends, objects, kept)
        self.units += units
        self.buckets += buckets
        s = np.asarray(starts, dtype=np.int64)
        e = np.asarray(ends, dtype=np.int64)
        lengths = e + 1 - s  # a last line without "\n" gets one added: same formula
        self.lengths.append(lengths if kept is None else lengths[np.asarray(kept, dtype=np.int64)])
        if self.sample is None:
            first = 0 if kept is None else kept[0]
            self.sample = shrink_sample(objects[first])


def _line_positions(block: bytes, stop: int) -> tuple[list[int], list[int]]:
    """Starts and newline positions of the lines in block[:stop] (a final line may lack \\n)."""
    starts: list[int] = []
    ends: list[int] = []
    find = block.find
    position = 0
    while position < stop:
        newline = find(b"\n", position, stop)
        if newline < 0:
            newline = stop  # the file's last line without a newline
        starts.append(position)
        ends.append(newline)
        position = newline + 1
    return starts, ends


def _record_errors(
    seg: SegmentResult, state: _ShardState, bad: list[tuple[int, tuple[str, str]]], first_line: int, segment_index: int
) -> bool:
    """Count bad lines of a block; in fail mode record the first and return True (stop)."""
    for index, (kind, message) in bad:
        line = first_line + index
        if state.on_error == "fail":
            state.failure = {"segment": segment_index, "line": line, "kind": kind, "message": message}
            return True
        seg.errors[kind] = seg.errors.get(kind, 0) + 1
        if len(seg.examples) < MAX_EXAMPLES:
            seg.examples.append([line, kind, message])
    return False


def _add_range(seg: SegmentResult, start: int, end: int) -> None:
    """Append a source byte range to the segment's pieces, merging adjacent ranges."""
    if end <= start:
        return
    if seg.pieces and seg.pieces[-1][0] == "range" and seg.pieces[-1][2] == start:
        seg.pieces[-1][2] = end
    else:
        seg.pieces.append(["range", start, end])


Progress = Callable[[int], None] | None
StopCheck = Callable[[], bool] | None


def _blocks(
    path: str, start: int, end: int, progress: Progress, should_stop: StopCheck
) -> Iterator[tuple[int, bytes, int, bool]]:
    """Yield (offset, block, stop, at_end): whole lines block[:stop] starting at file offset."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        carry = b""
        while position < end or carry:
            if should_stop is not None and should_stop():
                raise ShardAborted
            chunk = handle.read(min(BLOCK_BYTES, end - position)) if position < end else b""
            if not chunk and position < end:
                raise DataError(f"{path}: the file shrank while it was being indexed; re-run when it is complete")
            position += len(chunk)
            if progress is not None and chunk:
                progress(len(chunk))
            block = carry + chunk if carry else chunk
            at_end = position >= end
            stop = len(block) if at_end else block.rfind(b"\n") + 1
            if stop == 0:
                carry = block  # one line longer than a block: keep reading
                continue
            offset = position - len(block)
            yield offset, block, stop, at_end
            carry = block[stop:]
            if at_end:
                break


def _index_jsonl(
    seg: SegmentResult, segment_index: int, state: _ShardState, progress: Progress, should_stop: StopCheck
) -> None:
    """Validate, count and record the kept byte ranges of a jsonl segment."""
    line_number = 1  # local to the segment; the merge adds earlier segments' lines
    for offset, block, stop, at_end in _blocks(seg.path, seg.start, seg.end, progress, should_stop):
        starts, ends = _line_positions(block, stop)
        suspect: list[int] = []
        objects, bad = check_lines(block, starts, ends, suspect)
        seg.source_lines += len(starts)
        if bad and _record_errors(seg, state, bad, line_number, segment_index):
            return
        if suspect:
            seg.warnings[WARNING_CONTROL] = seg.warnings.get(WARNING_CONTROL, 0) + len(suspect)
            if not seg.first_warning_line:
                seg.first_warning_line = line_number + suspect[0]
        line_number += len(starts)
        badset = {index for index, _ in bad}
        kept = None if not bad else [i for i in range(len(starts)) if i not in badset]
        state.add_block(block, starts, ends, objects, kept)
        seg.kept_lines += len(starts) - len(bad)
        if kept is None:
            _add_range(seg, offset, offset + stop)
        else:
            for i in kept:
                _add_range(seg, offset + starts[i], offset + min(ends[i] + 1, stop))
        if (
            at_end
            and stop
            and block[stop - 1 : stop] != b"\n"
            and (kept is None or (kept and kept[-1] == len(starts) - 1))
        ):
            seg.pieces.append(["newline"])  # the file's last line lacks its newline


def _index_txt(
    seg: SegmentResult, segment_index: int, state: _ShardState, progress: Progress, should_stop: StopCheck
) -> None:
    """Convert a txt segment to jsonl lines in the shard's own data.jsonl, and count them."""
    line_number = 1
    for _offset, block, stop, _at_end in _blocks(seg.path, seg.start, seg.end, progress, should_stop):
        starts, ends = _line_positions(block, stop)
        seg.source_lines += len(starts)
        converted: list[bytes] = []
        bad: list[tuple[int, tuple[str, str]]] = []
        for index, (start, end) in enumerate(zip(starts, ends)):
            try:
                text = block[start:end].decode("utf-8")
            except UnicodeDecodeError as error:
                bad.append((index, ("invalid_utf8", f"not valid UTF-8 ({error.reason} at byte {error.start})")))
                continue
            line = txt_line_to_jsonl(text)
            if line is not None:  # blank text lines are simply not samples
                converted.append(line.encode("utf-8") + b"\n")
        if bad and _record_errors(seg, state, bad, line_number, segment_index):
            return
        line_number += len(starts)
        if not converted:
            continue
        payload = b"".join(converted)
        c_starts, c_ends = _line_positions(payload, len(payload))
        objects, _ = check_lines(payload, c_starts, c_ends)
        state.add_block(payload, c_starts, c_ends, objects, None)
        seg.kept_lines += len(converted)
        file_start, file_end = state.write_data(payload)
        if seg.pieces and seg.pieces[-1][0] == "file" and seg.pieces[-1][2] == file_start:
            seg.pieces[-1][2] = file_end
        else:
            seg.pieces.append(["file", file_start, file_end])


def index_shard(
    shard_spec: ShardSpec | dict[str, Any],
    out_dir: str | Path,
    *,
    options: IndexOptions,
    key: str = "",
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ShardResult:
    """Index one shard into `out_dir`; reuse a finished result already there.

    `progress` receives the number of input bytes read since the last call;
    `should_stop` is polled between blocks (fail mode stops later shards early).
    A bad line in fail mode yields a result with `failure` set (the caller raises).
    """
    spec = shard_spec if isinstance(shard_spec, ShardSpec) else ShardSpec.from_json(shard_spec)
    out = Path(out_dir)
    cached = load_shard_result(out)
    if cached is not None and cached.failure is None and (not key or cached.key == key):
        if progress is not None:
            progress(spec.nbytes)
        return cached
    tokenizer = None
    if options.tokenizer is not None:
        from fm9g.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(options.tokenizer)
    method = count_method(options.language, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name, "tmp")
    try:
        state = _ShardState(LineCounter(method, tokenizer), options.on_error, tmp / "data.jsonl")
        segments: list[SegmentResult] = []
        try:
            for segment_index, segment in enumerate(spec.segments):
                seg = SegmentResult(segment.path, segment.start, segment.end, segment.size, segment.mtime_ns)
                segments.append(seg)
                if segment.size == 0:
                    if _record_errors(seg, state, [(0, ("empty_file", "empty file"))], 0, segment_index):
                        break
                    continue
                if segment.kind == "txt":
                    _index_txt(seg, segment_index, state, progress, should_stop)
                else:
                    _index_jsonl(seg, segment_index, state, progress, should_stop)
                if state.failure is not None:
                    break
        finally:
            if state.data_handle is not None:
                state.data_handle.close()
        lengths = np.concatenate(state.lengths) if state.lengths else np.zeros(0, dtype=np.int64)
        bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        result = ShardResult(
            index=spec.index,
            key=key,
            method=method,
            language=options.language,
            nlines=len(lengths),
            nbytes=int(bounds[-1]),
            units=state.units,
            buckets=[int(b) for b in state.buckets],
            sample=state.sample,
            segments=segments,
            failure=state.failure,
        )
        if state.failure is None:
            np.save(tmp / "bounds.npy", bounds)
        write_json(tmp / "result.json", result.to_json())
        if out.exists():
            shutil.rmtree(out)  # an unfinished or failed earlier attempt
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def failure_message(path: str, line: int, kind: str, message: str) -> str:
    """The DataError text for the first bad line in fail mode."""
    where = f"{path}:{line}" if line > 0 else path
    return (
        f"{where}: {message}; {FIX_HINT.get(kind, 'fix the line')}, "
        "or drop bad lines with `fm9g-launch index --on-error skip` (build_index(..., on_error='skip') "
        "in Python); their counts go to meta.json"
    )


def main(argv: list[str] | None = None) -> int:
    """Slurm array entry point: index shard --task-id of --plan."""
    parser = argparse.ArgumentParser(prog="python -m fm9g.data.index_shard", description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, type=Path, help="PLAN.json written by plan_shards")
    parser.add_argument("--task-id", type=int, default=None, help="shard number (default: $SLURM_ARRAY_TASK_ID)")
    args = parser.parse_args(argv)
    task = args.task_id if args.task_id is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "-1"))
    try:
        plan = read_plan(args.plan)
        if not 0 <= task < len(plan["shards"]):
            raise DataError(f"--task-id {task} is outside the plan's {len(plan['shards'])} shards")
        raw = plan["shards"][task]
        options = IndexOptions(**plan["options"])
        shard_dir = plan_shard_dir(plan, task)
        sweep_stale(shard_dir.parent, shard_dir.name)  # a killed earlier attempt at this shard
        with reraise_no_space(shard_dir):
            result = index_shard(raw, shard_dir, options=options, key=raw["key"])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.failure is not None:
        failed = result.failure
        path = result.segments[failed["segment"]].path
        # The line number is local to this shard's part of the file; the merge names the exact line.
        with contextlib.suppress(Exception):
            print(
                f"error: shard {task}: "
                + failure_message(path, failed["line"], failed["kind"], failed["message"])
                + " (line counted from this shard's start)",
                file=sys.stderr,
            )
        return 1
    print(f"shard {task}: {result.nlines} lines, {result.nbytes} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
