"""The store job's one process (`python -m fm9g.launchers.store_host --run-dir RUN`).

Under supervise.on_node_loss wait/shrink every trainer rank forms its process groups
through one long-lived TCPStore.  It lives here, in a 1-CPU job of its own, so neither a
training node's loss nor the supervisor's death takes it down.  It listens on an
ephemeral port and publishes rendezvous/store.json with serial = the previous serial + 1
(0 for the first), so a rank that saw store N fail waits for N + 1.

It serves until control/DONE or control/cancel exists, a newer store took its place, or
it gets SIGTERM/SIGINT; then it keeps serving a few seconds more (ranks finishing their
last calls), writes its exit record, as a node agent does, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from fm9g.rundir import RunDir
from fm9g.rundir.atomic import write_json
from fm9g.rundir.store_endpoint import StoreEndpoint, publish_store_endpoint, read_store_endpoint

EXIT_GRACE_S = 3.0  # keep serving while the ranks finish their last store calls
POLL_S = 0.5
# The server's own client timeout; clients set theirs.
STORE_TIMEOUT = timedelta(seconds=300)


def log(job_id: str, host: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [store job={job_id} host={host}] {message}", flush=True)


def next_serial(run: RunDir) -> int:
    """The serial this store publishes: the last published one + 1, or 0."""
    previous = read_store_endpoint(run.store_endpoint)
    return previous.serial + 1 if previous is not None else 0


def stop_reason(run: RunDir, mine: StoreEndpoint) -> str | None:
    """Why the store should stop now (a control flag, or a newer store), else None."""
    if run.done_flag.exists():
        return "control/DONE exists: the run is done"
    if run.cancel_flag.exists():
        return "control/cancel exists: the run was cancelled"
    current = read_store_endpoint(run.store_endpoint)
    if current is not None and current.serial > mine.serial and current.job_id != mine.job_id:
        return f"store serial {current.serial} (job {current.job_id}) took this one's place"
    return None


def serve(run: RunDir, host: str, job_id: str, stop: threading.Event, grace: float) -> int:
    """Host the store, publish it, and serve until told to stop; the exit code."""
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True, timeout=STORE_TIMEOUT)
    mine = StoreEndpoint(host=host, port=int(store.port), serial=next_serial(run), job_id=job_id)
    publish_store_endpoint(run.store_endpoint, mine)
    log(job_id, host, f"serving the run's TCPStore at {mine.address} (serial {mine.serial})")
    reason = None
    while reason is None:
        reason = "a signal" if stop.wait(POLL_S) else stop_reason(run, mine)
    log(job_id, host, f"stopping ({reason}); serving {grace:g}s more while the ranks finish")
    stop.clear()
    stop.wait(grace)  # a second signal ends the grace at once
    del store
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.store_host",
        description="Host the run's TCPStore (the store job of supervise.on_node_loss wait/shrink).",
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--grace", type=float, default=EXIT_GRACE_S, help="seconds to keep serving once told to stop")
    args = parser.parse_args(argv)
    run = RunDir.of(args.run_dir)
    host = os.environ.get("FM9G_HOST") or socket.gethostname()
    job_id = os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = serve(run, host, job_id, stop, args.grace)
    write_json(run.exit_record(job_id), {"code": code, "time": time.time(), "role": "store"})
    return code


if __name__ == "__main__":
    sys.exit(main())
