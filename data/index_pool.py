"""A small process pool for the indexer: jobs out, results back, shared progress and stop.

multiprocessing.Pool cannot hand its workers shared counters except through
module-level globals set by an initializer; here each worker gets, at start, one slot
of a shared byte counter (progress without messages per block) and a shared "stop
shards after K" value (fail mode: when shard K fails, later shards stop early while
earlier ones finish, so the first bad line in input order is still found). Workers
are forked where the platform allows: they only run numpy/msgspec code, and forking
is far cheaper than spawning interpreters that re-import numpy and h5py.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from typing import Any

from fm9g.data.errors import DataError
from fm9g.data.index_merge import WriteJob, write_shard_part
from fm9g.data.index_shard import ShardAborted, index_shard

NO_FAILURE = 1 << 62


def _run_job(job: tuple[Any, ...], slot: Any, worker: int, stop_after: Any) -> Any:
    kind = job[0]
    if kind == "index":
        _, spec, out_dir, options, key = job

        def progress(count: int) -> None:
            slot[worker] += count

        def should_stop() -> bool:
            return stop_after.value < spec.index

        if should_stop():
            raise ShardAborted
        return index_shard(spec, out_dir, options=options, key=key, progress=progress, should_stop=should_stop)
    if kind == "write":
        write_shard_part(job[1])
        return None
    raise ValueError(f"unknown job {kind}")


def _worker_main(worker: int, jobs: Any, results: Any, slot: Any, stop_after: Any) -> None:
    while True:
        item = jobs.get()
        if item is None:
            return
        number, job = item
        try:
            results.put((number, "ok", _run_job(job, slot, worker, stop_after)))
        except ShardAborted:
            results.put((number, "aborted", None))
        except DataError as error:
            results.put((number, "data_error", str(error)))
        except BaseException:  # report, do not die: the parent would wait forever
            results.put((number, "crash", traceback.format_exc()))


class IndexPool:
    """N worker processes running index and write jobs."""

    def __init__(self, processes: int) -> None:
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self._jobs = self._ctx.Queue()
        self._results = self._ctx.Queue()
        self._slot = self._ctx.Array("q", processes, lock=False)
        self._stop_after = self._ctx.Value("q", NO_FAILURE, lock=False)
        self._workers = [
            self._ctx.Process(
                target=_worker_main,
                args=(i, self._jobs, self._results, self._slot, self._stop_after),
                daemon=True,
                name=f"fm9g-index-{i}",
            )
            for i in range(processes)
        ]
        for process in self._workers:
            process.start()
        self._submitted = 0
        self._pending = 0

    def done_bytes(self) -> int:
        """Input bytes read by all workers so far."""
        return int(sum(self._slot))

    def stop_after(self, shard_index: int) -> None:
        """Make shards with a larger index stop at their next block."""
        self._stop_after.value = min(self._stop_after.value, shard_index)

    def submit(self, job: tuple[Any, ...]) -> int:
        """Queue a job ("index", spec, out_dir, options, key) or ("write", WriteJob); return its number."""
        number = self._submitted
        self._submitted += 1
        self._pending += 1
        self._jobs.put((number, job))
        return number

    def drain(self, on_result: Callable[[int, str, Any], None], tick: Callable[[], None] | None = None) -> None:
        """Wait for every submitted job (on_result may submit more); call on_result(number, status, value)."""
        while self._pending:
            try:
                number, status, value = self._results.get(timeout=0.2)
            except queue.Empty:
                if tick is not None:
                    tick()
                dead = [p.name for p in self._workers if not p.is_alive()]
                if dead:
                    raise DataError(f"index worker {', '.join(dead)} died (out of memory?); re-run with fewer processes")
                continue
            self._pending -= 1
            if status == "crash":
                raise RuntimeError(f"index worker crashed:\n{value}")
            on_result(number, status, value)
            if tick is not None:
                tick()

    def run_writes(self, jobs: list[WriteJob]) -> None:
        """Run merge write jobs in parallel (a `WriteRunner`)."""

        def check(number: int, status: str, value: Any) -> None:
            if status == "data_error":
                raise DataError(value)

        for job in jobs:
            self.submit(("write", job))
        self.drain(check)

    def close(self, terminate: bool = False) -> None:
        """Stop the workers; `terminate` kills busy ones at once (after an error)."""
        for process in self._workers:
            if terminate:
                process.terminate()
            else:
                self._jobs.put(None)
        for process in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join()
        self._jobs.close()
        self._results.close()
