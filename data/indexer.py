"""Build an FM9G index directory from jsonl/txt inputs: `build_index`.

The work is split into shards (`index_plan`), each shard is validated and counted
(`index_shard`) in a process pool (`index_pool`), and the shard results are merged
into the output (`index_merge`). A shard is copied into the output as soon as it and
all shards before it are done (its offset is then known), so the copy and the
flush to disk overlap the indexing of later shards (a writer thread of the
calling process does this; the pool only indexes). The same pieces run as a Slurm array:
`plan_shards` → `python -m fm9g.data.index_shard --plan P --task-id K` per shard →
`python -m fm9g.data.index_merge --plan P`.

Caching: with `cache_dir`, each shard's result is kept under `<cache_dir>/shards/<key>`
(key: see `index_plan`) and a re-run skips shards whose result is there, e.g. after an
interrupted build. Without it the shard results live in a temporary directory next
to the output that is removed when the build ends, successfully or not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fm9g.data.errors import DataError, reraise_no_space
from fm9g.data.index_merge import OutputBuilder, check_replaceable, merge_shards, raise_first_failure, write_shard_part
from fm9g.data.index_plan import (
    check_output,
    choose_shard_count,
    collect_inputs,
    plan_shards,
    shard_key,
    split_shards,
    tokenizer_identity,
)
from fm9g.data.index_pool import IndexPool
from fm9g.data.index_shard import index_shard, load_shard_result
from fm9g.data.index_temp import make_temp_dir, remove_own, sweep_stale
from fm9g.data.index_types import IndexOptions, IndexResult, Language, ShardResult, ShardSpec, validate_options
from fm9g.data.tokenizer import Tokenizer

__all__ = ["IndexResult", "build_index", "index_shard", "merge_shards", "plan_shards", "validate_options"]

ProgressCallback = Callable[[int, int], None]


class _Build:
    """One local build: index shards (pool or in-process) and place them as they finish.

    A shard is placed (given its offset in data.jsonl and a write job) as soon as it
    and every shard before it are done, so copying and flushing early shards overlaps
    with indexing later ones.
    """

    def __init__(
        self,
        dirs: list[Path],
        specs: list[ShardSpec],
        options: IndexOptions,
        builder: OutputBuilder,
        pool: IndexPool | None,
        report: Callable[[int], None],
    ) -> None:
        self.dirs, self.specs, self.options = dirs, specs, options
        self.builder, self.pool, self.report = builder, pool, report
        self.results: list[ShardResult | None] = [None] * len(specs)
        self.placed = 0
        self.writes: list[Future[None]] = []
        # Writes run on a thread of this process, pool or not: they are kernel copies
        # and flushes (no GIL held), and this process is otherwise idle while workers index.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm9g-index-writer")
        self.jobs: dict[int, int] = {}

    def place_ready(self) -> None:
        """Place every shard whose predecessors are all done and clean."""
        while self.placed < len(self.results):
            result = self.results[self.placed]
            if result is None or result.failure is not None:
                return
            job = self.builder.place(self.dirs[self.placed], result)
            self.writes.append(self.writer.submit(write_shard_part, job))
            self.placed += 1

    def run(self, todo: list[int]) -> None:
        """Index the shards numbered `todo` and write every shard's part."""
        try:
            self.place_ready()
            if self.pool is None:
                for k in todo:
                    spec, out_dir = self.specs[k], self.dirs[k]
                    result = index_shard(spec, out_dir, options=self.options, key=out_dir.name, progress=self.report)
                    self.results[k] = result
                    if result.failure is not None:
                        break  # the first bad line in input order is found; later shards are moot
                    self.place_ready()
            else:
                self._run_pool(self.pool, todo)
            for future in self.writes:
                future.result()
        finally:
            self.writer.shutdown(wait=True, cancel_futures=True)

    def _run_pool(self, pool: IndexPool, todo: list[int]) -> None:
        for k in todo:
            job = ("index", self.specs[k], str(self.dirs[k]), self.options, self.dirs[k].name)
            self.jobs[pool.submit(job)] = k

        def on_result(number: int, status: str, value: Any) -> None:
            k = self.jobs.pop(number)
            if status == "data_error":
                raise DataError(value)
            if status == "ok":
                self.results[k] = value
                if value.failure is not None:
                    pool.stop_after(self.specs[k].index)
                self.place_ready()

        pool.drain(on_result, lambda: self.report(0))


def build_index(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    language: Language = "zh",
    tokenizer: str | Path | Tokenizer | None = None,
    processes: int = 1,
    on_error: Literal["fail", "skip"] = "fail",
    progress: ProgressCallback | None = None,
    cache_dir: str | Path | None = None,
    durable: bool = True,
) -> IndexResult:
    """Index jsonl/txt `inputs` (files or directories) into the index directory `output`.

    Token statistics use `tokenizer` when given, else the original estimate rule for
    `language`. `on_error="fail"` raises a DataError naming the first bad file:line;
    "skip" drops bad lines and reports counts per file (meta.json and the result).
    `progress(done_bytes, total_bytes)` is called as input is read. `durable` fsyncs
    the output before it is renamed into place. A full disk (ENOSPC, or the quota)
    raises a DataError naming the filesystem and its free space, after the
    half-built output has been removed.
    """
    # Reported after _build_index cleaned up, so the free space shown is what is left.
    with reraise_no_space(Path(output).absolute().parent):
        return _build_index(
            inputs,
            Path(output).absolute(),
            language=language,
            tokenizer=tokenizer,
            processes=processes,
            on_error=on_error,
            progress=progress,
            cache_dir=cache_dir,
            durable=durable,
        )


def _build_index(
    inputs: str | Path | Sequence[str | Path],
    out: Path,
    *,
    language: Language,
    tokenizer: str | Path | Tokenizer | None,
    processes: int,
    on_error: Literal["fail", "skip"],
    progress: ProgressCallback | None,
    cache_dir: str | Path | None,
    durable: bool,
) -> IndexResult:
    validate_options(language, on_error, processes)
    files = collect_inputs(inputs)
    check_output(files, inputs, out)
    check_replaceable(out)
    tok_path, tok_sha = tokenizer_identity(tokenizer)
    options = IndexOptions(language=language, tokenizer=tok_path, tokenizer_sha1=tok_sha, on_error=on_error)
    total = sum(path.stat().st_size for path in files)
    specs = split_shards(files, choose_shard_count(total, processes))

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir is None
    pool: IndexPool | None = None
    failed = True
    try:
        work = make_temp_dir(out.parent, out.name, "work") if temporary else Path(cache_dir).absolute()  # type: ignore[arg-type]
        # Shard folders of a killed earlier build in a kept cache: one sweep for all shards.
        swept_shards = [] if temporary else sweep_stale(work / "shards")
        dirs = [work / "shards" / shard_key(spec, options) for spec in specs]
        keys = [d.name for d in dirs]
        cached = [
            k
            for k, d in enumerate(dirs)
            if (r := load_shard_result(d)) is not None and r.failure is None and r.key == keys[k]
        ]
        todo = [k for k in range(len(specs)) if k not in set(cached)]
        done_before = sum(specs[k].nbytes for k in cached)
        read_here = [0]

        def report(count: int) -> None:
            read_here[0] += count
            if progress is not None:
                done = done_before + read_here[0] + (pool.done_bytes() if pool is not None else 0)
                progress(min(done, total), total)

        report(0)
        if processes > 1 and len(todo) > 1:
            pool = IndexPool(min(processes, len(todo)))
        # It sweeps the folders a killed earlier build left beside the output (index_temp).
        # A failure below needs no abort of its own: remove_own in `finally` removes them by name.
        builder = OutputBuilder(out, durable)
        build = _Build(dirs, specs, options, builder, pool, report)
        for k in cached:
            build.results[k] = load_shard_result(dirs[k])
        build.run(todo)
        raise_first_failure(build.results)
        if progress is not None:
            progress(total, total)
        done = [r for r in build.results if r is not None]
        if len(done) != len(specs):
            raise DataError(f"{out}: {len(specs) - len(done)} shards did not finish; run the index again")
        result = builder.finish(done, shards_cached=len(cached))
        failed = False
        swept = builder.swept + swept_shards
        result.stale_removed = [str(item.path) for item in swept]
        result.stale_bytes = sum(item.nbytes for item in swept)
        return result
    finally:
        if pool is not None:
            pool.close(terminate=failed)
        if failed:  # by name: an interrupt may land before `work` or the builder is assigned
            remove_own(out.parent, out.name)
        elif temporary:
            shutil.rmtree(work, ignore_errors=True)
