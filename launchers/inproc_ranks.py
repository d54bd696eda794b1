"""The node agent under in-process recovery (`supervise.on_node_loss: wait | shrink`):
start this node's trainer ranks itself and restart only a rank that died.

torchrun is not used here: its agent stops every local rank when one fails, and its
cross-node rendezvous restarts every node's ranks when any node joins or leaves, which
is exactly what in-process recovery avoids.  The ranks find each other through the run's
store job (`model.inproc_train`).

Ranks are forked from a starter that imported torch (and `torch._dynamo`, which building
an optimizer imports, about 1.6 s on its own): a multiprocessing forkserver with those
modules preloaded.  The node pays the cold import once; a restarted rank starts in tens of
milliseconds instead of seconds.

The agent's own duties while ranks run: SIGKILL a local rank the others declared hung
(gloo cannot abort a collective, so the kill is what frees the survivors), and record
every rank exit, restart and fallback in `events/inproc/agent-n<k>-<job>.jsonl`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from fm9g.rundir import RunDir, protocol
from fm9g.rundir.config import RunConfig
from fm9g.rundir.inproc_events import EventWriter, trainer_uid
from fm9g.rundir.store_endpoint import read_store_endpoint, session_namespace

PRELOAD = ["torch", "torch._dynamo", "fm9g.model.inproc_train"]
POLL_S = 0.1
FATAL = (protocol.EXIT_CONFIG, protocol.EXIT_NO_SPACE)


def _rank_entry(run_dir: str, env: dict[str, str]) -> None:
    """In the forked child: die with the starter (and so with the agent), then train."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    from fm9g.model.inproc_train import rank_main

    rank_main(run_dir, env)


@dataclass
class Rank:
    local_rank: int
    process: BaseProcess
    uid: str
    restarts: int = 0
    finished: bool = False
    exits: list[int] = field(default_factory=list)


class LocalRanks:
    """This node's ranks: started once, each restarted alone when it dies."""

    def __init__(self, run: RunDir, config: RunConfig, node_rank: int, nproc: int, env: dict[str, str], job_id: str):
        self.run, self.config, self.node_rank, self.nproc = run, config, node_rank, nproc
        self.env = env
        self.events = EventWriter(run.inproc_events, f"agent-n{node_rank}-{job_id}", node_rank=node_rank)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.ranks: dict[int, Rank] = {}
        self.budget = 2 * config.supervise.app_retries + 2  # restarts of this node's ranks before the agent gives up
        self.killed: set[str] = set()
        self._store: Any = None
        self._store_serial = -1
        self._store_checked = 0.0

    # ------------------------------------------------------------------ ranks
    def start(self, local_rank: int, fresh: bool) -> Rank:
        env = dict(self.env)
        env["FM9G_LOCAL_RANK"] = str(local_rank)
        env["FM9G_LOCAL_WORLD_SIZE"] = str(self.nproc)
        if fresh:
            env["FM9G_INPROC_FRESH"] = "1"
        process = self.context.Process(
            target=_rank_entry, args=(str(self.run.root), env), name=f"rank-n{self.node_rank}r{local_rank}"
        )
        process.start()
        previous = self.ranks.get(local_rank)
        rank = Rank(local_rank, process, trainer_uid(self.node_rank, local_rank, process.pid))
        if previous is not None:
            rank.restarts, rank.exits = previous.restarts + 1, previous.exits
        self.ranks[local_rank] = rank
        return rank

    def stop(self, grace: float) -> None:
        """SIGTERM every live rank, then SIGKILL what is left after `grace` seconds."""
        live = [rank.process for rank in self.ranks.values() if rank.process.exitcode is None]
        for process in live:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()

    def supervise(self, log: Any) -> int:
        """Run the node's ranks until each has finished; the agent's exit code (0: every
        rank exited cleanly, which the agent maps to done or continue)."""
        for local_rank in range(self.nproc):
            self.start(local_rank, fresh=False)
        restarts = 0
        while True:
            for rank in list(self.ranks.values()):
                code = rank.process.exitcode
                if rank.finished or code is None:
                    continue
                rank.exits.append(code)
                self.events("rank_exit", {"local_rank": rank.local_rank, "pid": rank.process.pid, "code": code})
                if code == protocol.EXIT_OK:
                    rank.finished = True
                    continue
                if code in FATAL or self.run.done_flag.exists():
                    log(f"rank {rank.uid} exited {code}: stopping this node's ranks")
                    self.stop(self.config.rendezvous.term_grace)
                    return code if code in FATAL else protocol.EXIT_OK
                if restarts >= self.budget:
                    log(f"rank {rank.uid} exited {code} and {restarts} restarts are spent: giving up on this node")
                    self.stop(self.config.rendezvous.term_grace)
                    return protocol.EXIT_FAILED
                restarts += 1
                fallback = code == protocol.EXIT_FALLBACK
                if fallback:
                    self.events("fallback", {"local_rank": rank.local_rank, "reason": "in-process recovery gave up"})
                why = "fell back to the disk checkpoint" if fallback else f"died ({_describe(code)})"
                log(f"rank {rank.uid} {why}: restarting it alone")
                new = self.start(rank.local_rank, fresh=fallback)
                self.events(
                    "rank_restart",
                    {"local_rank": rank.local_rank, "replacement": not fallback, "reason": why, "pid": new.process.pid},
                )
            if all(rank.finished for rank in self.ranks.values()):
                return protocol.EXIT_OK
            self.kill_lost(log)
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ hung ranks
    def kill_lost(self, log: Any) -> None:
        """SIGKILL a local rank its peers declared lost (hung) in the store."""
        store = self._connect()
        if store is None:
            return
        from fm9g.model.generation_heartbeats import lost_members

        try:
            lost = lost_members(store)
        except Exception:  # the store job is gone: the ranks fall back by themselves
            self._store = None
            return
        mine = {rank.uid: rank for rank in self.ranks.values() if rank.process.exitcode is None}
        for record in lost:
            rank = mine.get(record.uid)
            if rank is None or record.uid in self.killed:
                continue
            self.killed.add(record.uid)
            log(f"rank {record.uid} was declared hung by {record.by} after {record.silent_s:.1f}s: killing it")
            self.events("killed_lost", {"lost_uid": record.uid, "pid": rank.process.pid})
            rank.process.kill()

    def _connect(self) -> Any:
        """A client of the store job, re-made when a new store job is published."""
        now = time.monotonic()
        if now - self._store_checked < 1.0:
            return self._store
        self._store_checked = now
        endpoint = read_store_endpoint(self.run.store_endpoint)
        if endpoint is None:
            return None
        if self._store is not None and endpoint.serial == self._store_serial:
            return self._store
        import torch.distributed as dist

        from fm9g.model.generations import connect

        try:
            client = connect(endpoint.host, endpoint.port, timeout_s=5.0)
        except (dist.DistError, RuntimeError):
            return None
        namespace = session_namespace(self.run.name, self.env.get(protocol.ENV_GENERATION, "0"))
        self._store = dist.PrefixStore(namespace + "/", client)  # scoped as the ranks scope theirs
        self._store_serial = endpoint.serial
        return self._store


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def rank_environment(base: dict[str, str], nproc: int) -> dict[str, str]:
    """The environment every rank of this node starts with (the agent's, plus thread limits).
    Oversubscribed OpenMP threads spin against each other: on 2 cores, two trainers with 2
    threads each ran 30x slower than with 1 each."""
    env = dict(base)
    if "OMP_NUM_THREADS" not in env:
        cpus = int(env.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cpus // nproc))
    return env
