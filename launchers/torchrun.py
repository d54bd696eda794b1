"""Build and run the torchrun command of one node, and stop it cleanly or hard.

torchrun runs in its own session (process group) so that the agent can take down it
and its trainers together: after a hard crash of the master node torchrun can sit in
`TCPStore.get` for minutes and ignore SIGTERM, so a stale torchrun gets SIGTERM, a
grace period, then SIGKILL of the whole group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from fm9g.rundir.config import RendezvousConfig
from fm9g.rundir.endpoint import Endpoint


@dataclass(frozen=True)
class TrainerCommand:
    module: str
    args: tuple[str, ...]


def torchrun_argv(
    endpoint: Endpoint,
    *,
    nnodes: int,
    nproc_per_node: int,
    rdzv: RendezvousConfig,
    trainer: TrainerCommand,
    local_addr: str | None = None,
) -> list[str]:
    """The torchrun command line for one node of `endpoint`'s generation."""
    conf = ",".join(
        [
            # The store lives in the master agent's process, never in torchrun.
            "is_host=false",
            f"join_timeout={rdzv.join_timeout}",
            # Faster keep-alives detect a lost node in ~3 s instead of ~15 s.
            f"keep_alive_interval={rdzv.keep_alive_interval}",
            f"keep_alive_max_attempt={rdzv.keep_alive_max_attempt}",
        ]
    )
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint.address}",
        f"--rdzv-id={endpoint.rdzv_id}",
        f"--rdzv-conf={conf}",
        f"--max-restarts={rdzv.max_restarts}",
    ]
    if local_addr:
        argv.append(f"--local-addr={local_addr}")
    argv += ["-m", trainer.module, *trainer.args]
    return argv


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the agent dies, however it dies, so a
    killed agent never leaves an orphan torchrun holding a place in the rendezvous."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TorchrunProcess:
    """One torchrun child in its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float) -> int:
        """SIGTERM the group, then SIGKILL it if still alive after `grace` seconds."""
        self.signal_group(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            return self.process.wait()

    def wait(
        self, should_stop: Callable[[], str | None], grace: float, interval: float = 0.5
    ) -> tuple[int, str | None]:
        """Wait for exit; when `should_stop()` returns a reason, stop the group early.

        Returns (exit code, the stop reason or None)."""
        while True:
            rc = self.process.poll()
            if rc is not None:
                break
            reason = should_stop()
            if reason:
                rc = self.stop(grace)
                self.signal_group(signal.SIGKILL)  # trainers left behind by a killed torchrun
                return rc, reason
            time.sleep(interval)
        self.signal_group(signal.SIGKILL)
        return rc, None
