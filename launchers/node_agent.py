"""The node agent: the one process each node job runs (`python -m fm9g.launchers.node_agent`).

master: hosts a plain c10d TCPStore in its own process, so the store outlives torchrun's
        worker-group restarts, publishes rendezvous/endpoint.json, runs torchrun as a
        client of that store, and, when torchrun fails while the run is not done,
        publishes generation + 1 itself (one node exhausting its restarts closes the
        rendezvous for everyone).
worker: waits (bounded) for an endpoint of at least its generation, runs torchrun, and
        after a failure waits for a newer generation inside the allocation it holds.
        While torchrun runs it watches the endpoint: a newer generation means the master
        was replaced, and the old torchrun is stopped hard (a crashed master node leaves
        it blocked in TCPStore.get).

Both turn Slurm's USR1 (walltime or preemption warning) into the checkpoint-now flag that
every rank reads at a step boundary; torchrun itself would die on USR1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Literal

from fm9g.launchers.inproc_ranks import LocalRanks, rank_environment
from fm9g.launchers.torchrun import TorchrunProcess, TrainerCommand, torchrun_argv
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.atomic import write_json
from fm9g.rundir.config import RunConfig, load_resolved
from fm9g.rundir.endpoint import Endpoint, next_generation, publish_endpoint, read_endpoint
from fm9g.rundir.protocol import slug

TRAINER = "fm9g.model.train"
MASTER_EXIT_GRACE_S = 3.0  # keep the store up while the other agents finish their exit barrier


class RendezvousTimeout(RuntimeError):
    """No endpoint appeared in time: the master job never started, or failed early."""


class NodeAgent:
    def __init__(
        self,
        role: Literal["master", "worker"],
        run: RunDir,
        config: RunConfig,
        node_rank: int,
        generation: int,
        in_allocation: bool = False,
    ) -> None:
        self.role = role
        self.run = run
        self.config = config
        self.node_rank = node_rank
        self.generation = generation
        self.job_id = os.environ.get("SLURM_JOB_ID", f"pid{os.getpid()}")
        self.host = os.environ.get("FM9G_HOST") or socket.gethostname()
        # One step of a multi-node allocation (cluster.start: together): the job id is
        # shared with the other nodes, so this node's records carry its rank.
        self.in_allocation = in_allocation
        self.child: TorchrunProcess | LocalRanks | None = None
        self.preempted = False

    @property
    def exit_record(self) -> Path:
        return self.run.exit_record(self.job_id, self.node_rank if self.in_allocation else None)

    def enter_allocation(self) -> None:
        """Record this step's host and id (the supervisor cancels or releases one node by
        them), then drop srun's step variables so torchrun sees a single-node job."""
        from fm9g.launchers.slurm_env import single_node_environment

        write_json(
            self.run.step_record(self.job_id, self.node_rank),
            {"host": self.host, "step": os.environ.get("SLURM_STEP_ID"), "time": time.time()},
        )
        clean = single_node_environment(os.environ, self.host)
        for key in set(os.environ) - set(clean):
            del os.environ[key]
        os.environ.update(clean)

    # ------------------------------------------------------------------ plumbing
    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(
            f"{stamp} [agent {self.role} node{self.node_rank} job={self.job_id} host={self.host}] {message}", flush=True
        )

    def install_signals(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)

    def _on_usr1(self, signum: int, frame: object) -> None:
        self.preempted = True
        write_json(
            self.run.checkpoint_now_flag, {"time": time.time(), "job_id": self.job_id, "node_rank": self.node_rank}
        )
        self.log("USR1: raised the checkpoint-now flag; the trainer saves at the next step and exits")

    def _on_term(self, signum: int, frame: object) -> None:
        self.log(f"signal {signum}: stopping torchrun and exiting")
        if self.child is not None:
            self.child.stop(self.config.rendezvous.term_grace)
        os._exit(128 + signum)

    def nproc_per_node(self) -> int:
        cluster = self.config.cluster
        return cluster.procs_per_node or cluster.gpus_per_node or 1

    def fatal_reason(self) -> str | None:
        path = self.run.fatal_record
        if not path.exists():
            return None
        try:
            return str(json.loads(path.read_text(encoding="utf-8")).get("reason", "unknown"))
        except (OSError, ValueError):
            return "unreadable fatal.json"

    def outcome(self, rc: int) -> int | None:
        """The agent's exit code when the run (or this stage) is over, else None."""
        if self.run.done_flag.exists():
            return protocol.EXIT_OK
        reason = self.fatal_reason()
        if reason:
            self.log(f"the trainer reported a fatal error; not retrying: {reason}")
            # A full disk keeps its own code (the supervisor says "free space, then resume"); torchrun's
            # rc is not the trainer's, so the code comes from the record.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if (
                    json.loads(self.run.fatal_record.read_text(encoding="utf-8")).get("exit_code")
                    == protocol.EXIT_NO_SPACE
                ):
                    return protocol.EXIT_NO_SPACE
            return protocol.EXIT_CONFIG
        if rc == 0 or self.preempted:
            # Checkpointed on request (or stopped cleanly short of the end): continue me.
            self.log("checkpointed before the end of training: exiting with the continue code")
            return protocol.EXIT_CONTINUE
        return None

    def run_torchrun(self, endpoint: Endpoint) -> int:
        argv = torchrun_argv(
            endpoint,
            nnodes=self.config.cluster.nodes,
            nproc_per_node=self.nproc_per_node(),
            rdzv=self.config.rendezvous,
            trainer=TrainerCommand(TRAINER, ("--run-dir", str(self.run.root))),
            local_addr=os.environ.get("FM9G_HOST"),
        )
        env = rank_environment(dict(os.environ), self.nproc_per_node())
        env.update(
            {
                protocol.ENV_RUN_DIR: str(self.run.root),
                protocol.ENV_NODE_RANK: str(self.node_rank),
                protocol.ENV_GENERATION: str(endpoint.generation),
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            }
        )
        self.log(
            f"generation {endpoint.generation}: torchrun --rdzv-endpoint={endpoint.address} --rdzv-id={endpoint.rdzv_id}"
        )
        started = time.time()
        self.child = TorchrunProcess(argv, env)
        rc, reason = self.child.wait(lambda: self.superseded(endpoint), self.config.rendezvous.term_grace)
        self.child = None
        why = f" ({reason})" if reason else ""
        self.log(f"torchrun exited rc={rc} after {time.time() - started:.1f}s{why}")
        return rc

    def superseded(self, endpoint: Endpoint) -> str | None:
        current = read_endpoint(self.run.endpoint)
        if current is None:
            return None
        if current.generation > endpoint.generation:
            return f"generation {current.generation} was published by job {current.job_id}"
        if self.role == "master" and current.job_id != self.job_id:
            return f"job {current.job_id} took over the endpoint"
        return None

    # ------------------------------------------------------------------ roles
    def run_master(self) -> int:
        import torch.distributed as dist  # the only agent code that needs torch

        rdzv = self.config.rendezvous
        store = dist.TCPStore(
            self.host,
            rdzv.port,
            world_size=None,
            is_master=True,
            timeout=timedelta(seconds=rdzv.join_timeout),
            wait_for_workers=False,
        )
        generation = next_generation(self.generation, read_endpoint(self.run.endpoint))
        bumps_left = self.config.supervise.app_retries
        self.log(f"c10d store listening on {self.host}:{store.port}")
        while True:
            endpoint = Endpoint(
                host=self.host,
                port=store.port,
                generation=generation,
                job_id=self.job_id,
                rdzv_id=f"{slug(self.run.name)}-{generation}",
            )
            publish_endpoint(self.run.endpoint, endpoint)
            self.log(f"published endpoint generation {generation}")
            rc = self.run_torchrun(endpoint)
            result = self.outcome(rc)
            if result is not None:
                if result == protocol.EXIT_OK:
                    time.sleep(MASTER_EXIT_GRACE_S)
                return result
            current = read_endpoint(self.run.endpoint)
            if current is not None and current.job_id != self.job_id:
                self.log(f"job {current.job_id} owns the endpoint now; this master steps aside")
                return rc
            if bumps_left <= 0:
                self.log("torchrun failed and the generation budget (supervise.app_retries) is spent")
                return rc or protocol.EXIT_FAILED
            bumps_left -= 1
            generation = max(generation, current.generation if current else generation) + 1
            self.log(f"torchrun failed and the run is not done: starting generation {generation}")

    def run_inproc(self) -> int:
        """supervise.on_node_loss wait/shrink: this node's ranks, each restarted alone when it
        dies; no torchrun and no endpoint (the ranks meet in the run's store job)."""
        if self.run.done_flag.exists():
            self.log("the run is done; nothing to start")
            return protocol.EXIT_OK
        env = rank_environment(dict(os.environ), self.nproc_per_node())
        env.update(
            {
                protocol.ENV_RUN_DIR: str(self.run.root),
                protocol.ENV_NODE_RANK: str(self.node_rank),
                protocol.ENV_GENERATION: str(self.generation),  # the session the ranks scope their keys with
            }
        )
        ranks = LocalRanks(self.run, self.config, self.node_rank, self.nproc_per_node(), env, self.job_id)
        self.child = ranks
        self.log(
            f"{self.nproc_per_node()} rank(s), in-process recovery "
            f"({self.config.supervise.on_node_loss}); store: {self.run.store_endpoint}"
        )
        rc = ranks.supervise(self.log)
        self.child = None
        result = self.outcome(rc)
        return rc if result is None else result

    def wait_for_endpoint(self, min_generation: int) -> Endpoint:
        timeout = self.config.rendezvous.endpoint_timeout
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            endpoint = read_endpoint(self.run.endpoint)
            if endpoint is not None and endpoint.generation >= min_generation:
                return endpoint
            if self.run.done_flag.exists():
                raise StopIteration
            if not announced:
                self.log(f"waiting for the master's endpoint (generation >= {min_generation}) in {self.run.endpoint}")
                announced = True
            if time.monotonic() > deadline:
                raise RendezvousTimeout(
                    f"no endpoint of generation >= {min_generation} appeared in {self.run.endpoint} within "
                    f"{timeout}s: check the master job's log under {self.run.logs}, or raise rendezvous.endpoint_timeout"
                )
            time.sleep(0.2)

    def run_worker(self) -> int:
        min_generation = self.generation
        while True:
            try:
                endpoint = self.wait_for_endpoint(min_generation)
            except StopIteration:
                self.log("the run is done; nothing to join")
                return protocol.EXIT_OK
            rc = self.run_torchrun(endpoint)
            result = self.outcome(rc)
            if result is not None:
                return result
            min_generation = endpoint.generation + 1
            self.log(f"waiting for the master to start generation {min_generation}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.node_agent",
        description="Run one node of a training stage (started by a rendered node job).",
    )
    parser.add_argument("role", choices=["master", "worker"])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--node-rank", required=True, type=int)
    parser.add_argument(
        "--generation",
        type=int,
        default=0,
        help="master: the generation to publish at least; worker: the oldest generation to join",
    )
    parser.add_argument(
        "--in-allocation",
        action="store_true",
        help="started by srun as one node of a multi-node allocation (cluster.start: together)",
    )
    args = parser.parse_args(argv)
    run = RunDir.of(args.run_dir)
    config = load_resolved(run.config)
    agent = NodeAgent(args.role, run, config, args.node_rank, args.generation, in_allocation=args.in_allocation)
    if args.in_allocation:
        agent.enter_allocation()
    agent.install_signals()
    agent.log(f"starting (SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')})")
    try:
        if config.supervise.on_node_loss != "restart":
            code = agent.run_inproc()
        else:
            code = agent.run_master() if args.role == "master" else agent.run_worker()
    except RendezvousTimeout as exc:
        agent.log(f"error: {exc}")
        code = protocol.EXIT_ENDPOINT_TIMEOUT
    write_json(
        agent.exit_record,
        {"code": code, "time": time.time(), "node_rank": args.node_rank, "role": args.role},
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
