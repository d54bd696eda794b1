"""Compute line samples ahead of time in worker processes; results are keyed, never reordered.

Workers only evaluate the pure function `SampleMaker.make(task, line, epoch)` for
keys the loader asks for; the loader decides the order in which results are used.
So the number of workers changes speed, never the batches, and prefetching never
moves the loader's state.

Workers are fresh interpreters started as `python -m fm9g.data.prefetch`, talking
over two pipes. Not fork: the trainer may hold CUDA contexts and many threads that a
fork would copy half-initialised. Not multiprocessing's spawn either: it re-runs the
caller's main script in every worker, which breaks scripts without a
`if __name__ == "__main__"` guard.

Inside a worker, `num_threads` reader threads (the guide's `dataloader_num_threads`)
compute the lines of each request concurrently: reads are slices of a memory map and
sentencepiece releases the GIL while it encodes, so threads add throughput without
another interpreter's memory; JSON decoding and Python transforms still take turns.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait

from fm9g.data.errors import DataError
from fm9g.data.samples import LineResult, SampleMaker

Key = tuple[int, int, int]  # (task, line, epoch)

# Keys per request message: amortises pipe and pickling overhead.
CHUNK = 8
# Finished results kept at most; old ones are dropped first (they are recomputable).
MAX_CACHED = 1 << 16
# Name prefix of a worker's reader threads (`<prefix>_<i>`; tests read it back).
READER_THREAD_PREFIX = "fm9g-reader"
# Unanswered requests per worker. Bounded so the request pipe never fills: a parent
# blocked writing requests while the worker is blocked writing results would deadlock.
MAX_LOAD = 32


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self, maker: SampleMaker, number: int, num_threads: int = 1) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        # the child must import what the parent imports (editable installs, test dirs)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fm9g.data.prefetch", str(to_child_r), str(from_child_w), str(num_threads)],
            pass_fds=(to_child_r, from_child_w),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.recv_conn = Connection(from_child_r, writable=False)
        self.name = f"fm9g-loader-{number} (pid {self.process.pid})"
        self.load = 0  # requests sent and not answered
        self.send(maker)

    def send(self, message: object) -> None:
        """Send to the worker; a worker that already exited becomes a DataError."""
        try:
            self.send_conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            self.process.wait()
            raise DataError(
                f"loader worker {self.name} exited with code {self.process.returncode} before it got its work; "
                "check that `python -m fm9g.data.prefetch` can import this environment, or use num_workers=0"
            ) from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # queued work is disposable: results are recomputable
        self.process.wait()
        self.send_conn.close()
        self.recv_conn.close()


class Prefetcher:
    """`get(key)` returns `maker.make(*key)`, computed by workers when `num_workers` > 0,
    each with `num_threads` reader threads."""

    def __init__(self, maker: SampleMaker, num_workers: int, num_threads: int = 1) -> None:
        if num_threads < 1 or (num_threads > 1 and num_workers == 0):
            raise DataError(
                f"num_threads={num_threads} needs num_workers >= 1 (the reader threads run inside the "
                "worker processes; got num_workers=0): raise num_workers or use num_threads=1"
            )
        self.maker = maker
        self.num_workers = num_workers
        self.num_threads = num_threads
        self._cache: dict[Key, LineResult] = {}
        self._in_flight: set[Key] = set()  # sent to a worker
        self._queued: dict[Key, None] = {}  # waiting for a worker with room, in order
        self._workers = [_Worker(maker, i, num_threads) for i in range(num_workers)]

    def request(self, keys: list[Key]) -> None:
        """Start computing these keys (no-op without workers or when already known)."""
        if not self._workers:
            return
        for key in keys:
            if key not in self._cache and key not in self._in_flight:
                self._queued[key] = None
        self._dispatch()

    def held(self) -> list[Key]:
        """Keys requested and not yet taken by `get`: queued, at a worker, or computed."""
        return [*self._queued, *self._in_flight, *self._cache]

    def _send(self, chunk: list[Key]) -> None:
        worker = min(self._workers, key=lambda w: w.load)
        worker.send(chunk)
        worker.load += 1
        self._in_flight.update(chunk)

    def _dispatch(self) -> None:
        while self._queued and min(w.load for w in self._workers) < MAX_LOAD:
            chunk = list(itertools.islice(self._queued, CHUNK))
            for key in chunk:
                del self._queued[key]
            self._send(chunk)

    def get(self, key: Key) -> LineResult:
        """The result for `key`, waiting for a worker or computing it here."""
        cached = self._cache.pop(key, None)
        if cached is not None:
            return cached
        if not self._workers:
            return self.maker.make(*key)
        if key not in self._in_flight:
            # needed now: send it ahead of the queue (one extra small message is safe)
            self._queued.pop(key, None)
            self._send([key])
        while key not in self._cache:
            self._receive()
        return self._cache.pop(key)

    def _receive(self) -> None:
        by_conn = {w.recv_conn: w for w in self._workers}
        ready = wait(list(by_conn), timeout=1.0)
        if not ready:
            dead = [w for w in self._workers if w.process.poll() is not None]
            if dead:
                raise DataError(
                    f"loader worker {dead[0].name} exited with code {dead[0].process.returncode} "
                    "(killed for memory?); retry with fewer workers or num_workers=0"
                )
            return
        for conn in ready:
            worker = by_conn[conn]  # type: ignore[index]
            try:
                status, keys, value = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                worker.process.wait()
                raise DataError(
                    f"loader worker {worker.name} exited with code {worker.process.returncode}; "
                    "retry with fewer workers or num_workers=0"
                ) from None
            worker.load -= 1
            if status == "crash":
                raise RuntimeError(f"loader worker {worker.name} failed:\n{value}")
            for item, result in zip(keys, value):
                self._in_flight.discard(item)
                self._cache[item] = result
        while len(self._cache) > MAX_CACHED:
            self._cache.pop(next(iter(self._cache)))
        self._dispatch()

    def close(self) -> None:
        """Stop the workers at once."""
        for worker in self._workers:
            worker.close()
        self._workers = []
        self._in_flight.clear()
        self._queued.clear()


def _serve(read_fd: int, write_fd: int, num_threads: int = 1) -> None:
    """Worker loop: receive the maker, then answer key chunks until the pipe closes."""
    incoming = Connection(read_fd, writable=False)
    outgoing = Connection(write_fd, readable=False)
    maker: SampleMaker = incoming.recv()
    # map() keeps the keys' order, so threads change speed, never the results.
    pool = ThreadPoolExecutor(num_threads, thread_name_prefix=READER_THREAD_PREFIX) if num_threads > 1 else None
    while True:
        try:
            keys = incoming.recv()
        except EOFError:
            return  # the loader closed or died
        try:
            results = list(pool.map(lambda key: maker.make(*key), keys)) if pool else maker.make_many(keys)
            outgoing.send(("ok", keys, results))
        except BaseException:  # e.g. a dataset that fails to open: report, do not hang the loader
            outgoing.send(("crash", keys, traceback.format_exc()))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
