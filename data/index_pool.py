"""A small process pool for the indexer: jobs out, results back, shared progress and stop.

multiprocessing.Pool cannot hand its workers shared counters except through
module-level globals set by an initializer; here each worker gets, at start, one slot
of a shared byte counter (progress without messages per block) and a shared "stop
shards after K" value (fail mode: when shard K fails, later shards stop early while
earlier ones finish, so the first bad line in input order is still found). Workers
are forked where the platform allows: they only run numpy/msgspec code, and forking
is far cheaper than spawning interpreters that re-import numpy and h5py.

Workers never outlive the indexing process: each asks the kernel for SIGKILL when its
parent dies (prctl PR_SET_PDEATHSIG, Linux) and also polls its parent pid between jobs
(every platform), so a `kill -9` of `fm9g-launch index` does not leave them blocked on
the job queue forever. PDEATHSIG fires when the *thread* that forked the worker exits,
not the process: an IndexPool must be created and closed by one long-lived thread (as
`build_index` does), never from a short-lived helper thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from fm9g.data.errors import DataError, reraise_no_space
from fm9g.data.index_shard import ShardAborted, index_shard

NO_FAILURE = 1 << 62
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Seconds between a worker's checks that its parent is still there, while it waits for a job.
PARENT_POLL_S = 1.0


def _die_with_parent(parent: int) -> None:
    """Make the kernel SIGKILL this worker when its parent (thread) dies; Linux only."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl: the parent-pid poll in _worker_main still ends the worker
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(parent: int) -> None:
    """Signals of a worker: the parent owns Ctrl-C and SIGTERM and stops the workers itself.

    A forked worker inherits the CLI's SIGTERM handler (which raises KeyboardInterrupt
    for clean-up); in a worker that would turn the parent's terminate() into a caught
    exception and a traceback instead of an exit, so both go back to their defaults
    here. The parent forks with both signals blocked (IndexPool.__init__), so none can
    reach the inherited handlers before this runs; they are unblocked at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


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
        with reraise_no_space(out_dir):
            return index_shard(spec, out_dir, options=options, key=key, progress=progress, should_stop=should_stop)
    raise ValueError(f"unknown job {kind}")


def _worker_main(worker: int, jobs: Any, results: Any, slot: Any, stop_after: Any, parent: int) -> None:
    _init_worker(parent)
    while True:
        try:
            item = jobs.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return  # orphaned (no PDEATHSIG here): nobody will read a result
            continue
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
    """N worker processes running index jobs."""

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
                args=(i, self._jobs, self._results, self._slot, self._stop_after, os.getpid()),
                daemon=True,
                name=f"fm9g-index-{i}",
            )
            for i in range(processes)
        ]
        self._start_workers()
        self._submitted = 0
        self._pending = 0

    def _start_workers(self) -> None:
        """Fork the workers so that no stop signal can land inside a fork.

        Two guards, because the kernel may hand a process-directed signal to any thread
        (a BLAS or tokenizer thread, not only this one): (1) the signals are blocked in
        this thread, so a child starts with them blocked and receives them only once
        _init_worker has reset the handlers; (2) while forking, the Python-level handlers
        only note the signal, so a KeyboardInterrupt cannot fire half-way through a fork
        (in the parent, or in a child that inherited the pending flag and would otherwise
        run on as a copy of the parent). A signal noted meanwhile is raised again for the
        caller's own handler once every worker exists and has been stopped.
        """
        noted: list[int] = []
        in_main = threading.current_thread() is threading.main_thread()  # only it may set handlers
        handlers = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS} if in_main else {}
        for signum in handlers:
            signal.signal(signum, lambda number, _frame: noted.append(number))
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for process in self._workers:
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a blocked signal lands in `noted` now
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if noted:
            self.close(terminate=True)
            signal.raise_signal(noted[0])  # to the caller's own handler, now restored

    def done_bytes(self) -> int:
        """Input bytes read by all workers so far."""
        return int(sum(self._slot))

    def stop_after(self, shard_index: int) -> None:
        """Make shards with a larger index stop at their next block."""
        self._stop_after.value = min(self._stop_after.value, shard_index)

    def submit(self, job: tuple[Any, ...]) -> int:
        """Queue a job ("index", spec, out_dir, options, key); return its number."""
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
                    raise DataError(
                        f"index worker {', '.join(dead)} died (out of memory?); re-run with fewer processes"
                    ) from None
                continue
            self._pending -= 1
            if status == "crash":
                raise RuntimeError(f"index worker crashed:\n{value}")
            on_result(number, status, value)
            if tick is not None:
                tick()

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
                process.kill()  # SIGKILL: neither blocked nor handled, so this join ends
                process.join()
        self._jobs.close()
        self._results.close()
