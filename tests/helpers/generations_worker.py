"""A toy trainer rank for the in-process recovery tests and benchmark.

Deterministic on purpose: a float64 Linear with Adam, and each step's data is MICRO
fixed micro-batches that depend on the step only; a rank of a world of w takes
MICRO/w of them by rank.  So the loss of every step is the same at any world size that
divides MICRO, and an uninterrupted run is a single process summing all of them
(`reference_losses`), which is what a `wait` (and even a `shrink`) run must reproduce.

Ranks start from a forkserver that imported torch once (`start_rank`): a cold
interpreter plus `import torch` costs seconds on a 2-core machine, several ranks starting
together many more, and the tests need their ranks in well under that.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MICRO = 12  # divisible by 1, 2, 3, 4: every world size the tests form
FEATURES, OUTPUTS, ROWS = 16, 4, 8


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + index)
    return (
        torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64),
        torch.randn(ROWS, OUTPUTS, generator=g, dtype=torch.float64),
    )


def build() -> tuple[torch.nn.Linear, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, OUTPUTS, dtype=torch.float64)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def local_loss(model: torch.nn.Module, step: int, indices: range) -> float:
    """Sum of the micro-batch losses; their gradients accumulate into .grad."""
    total = 0.0
    for i in indices:
        x, y = micro_batch(step, i)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        total += loss.item()
    return total


def reference_losses(steps: int) -> list[float]:
    """The uninterrupted run: one process, all micro-batches of every step."""
    model, opt = build()
    out = []
    for step in range(steps):
        total = local_loss(model, step, range(MICRO))
        for p in model.parameters():
            assert p.grad is not None
            p.grad /= MICRO
        opt.step()
        opt.zero_grad()
        out.append(total / MICRO)
    return out


class ToyState:
    """The caller-owned state the membership syncs: model, optimizer, step, and optional
    ballast (MB of zeros that travel with it, for the state-sync figure)."""

    def __init__(self, ballast_mb: float = 0.0) -> None:
        self.model, self.opt = build()
        self.step = 0
        self.ballast = torch.zeros(int(ballast_mb * 2**20 / 8), dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "ballast": self.ballast,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.ballast = state["ballast"]


class Log:
    """One JSON line per record, appended with a single write (a killed rank leaves at
    most a torn last line, which `read_log` drops)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps({"kind": kind, **fields}) + "\n").encode())


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def process_usage() -> dict[str, int]:
    """Resident memory (kB), OS threads and open file descriptors of this process."""
    status = Path("/proc/self/status").read_text().splitlines()
    fields = {key: value.split()[0] for key, _, value in (line.partition(":") for line in status) if value.split()}
    return {"rss_kb": int(fields["VmRSS"]), "threads": int(fields["Threads"]), "fds": len(os.listdir("/proc/self/fd"))}


def run_rank(spec: dict[str, Any]) -> None:
    """One rank: spec holds host, port, uid, log, steps, config (MembershipConfig fields),
    fresh (True: built from the seed; False: a replacement), and optional hooks:
    die_on [event, gen] (SIGKILL itself then), reform_every (request a generation after
    every k-th step), step_sleep, payload_mb (extra state to sync)."""
    entered = time.time()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from fm9g.model.generations import Membership, MembershipConfig, RecoveryFailed

    log = Log(Path(spec["log"]))
    state = ToyState(spec.get("payload_mb", 0.0))
    die_on = spec.get("die_on")

    def on_event(name: str, fields: dict[str, Any]) -> None:
        log("event", {"event": name, **fields})
        if name == "formed" and spec.get("sample_usage"):
            log("usage", {"gen": fields["gen"], **process_usage()})
        if die_on and name == die_on[0] and fields.get("gen") == die_on[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    config = MembershipConfig(**spec["config"])
    membership = Membership(
        spec["host"],
        spec["port"],
        spec["uid"],
        config,
        state,
        0 if spec.get("fresh", True) else None,
        on_event=on_event,
        rank_hint=spec.get("rank_hint"),
    )
    log("started", {"uid": spec["uid"], "pid": os.getpid(), "entered": entered, "t": time.time()})
    try:
        train(spec, membership, state, log)
    except RecoveryFailed as error:
        log("recovery_failed", {"uid": spec["uid"], "error": str(error), "t": time.time()})
        os._exit(3)  # the agent's cue for the fallback: restart from the disk checkpoint
    log("done", {"uid": spec["uid"], "step": state.step, "applied": membership.applied, "t": time.time()})
    membership.close()


def train(spec: dict[str, Any], membership: Any, state: ToyState, log: Log) -> None:
    """The caller's loop, as a trainer would write it."""
    while state.step < spec["steps"]:
        with membership.step() as guard:
            gen = guard.generation
            share = MICRO // gen.world_size
            total = local_loss(state.model, state.step, range(gen.rank * share, (gen.rank + 1) * share))
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            flat = torch.cat([*(g.reshape(-1) for g in grads), torch.tensor([total], dtype=torch.float64)])
            guard.all_reduce(flat)
            flat /= MICRO
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            guard.commit()
            state.opt.step()
            log(
                "applied",
                {
                    "uid": spec["uid"],
                    "step": state.step,
                    "gen": gen.number,
                    "world": gen.world_size,
                    "rank": gen.rank,
                    "loss": float(flat[-1]),
                    "t": time.time(),
                },
            )
            state.step += 1
        state.opt.zero_grad()
        every = spec.get("reform_every")
        due = every and guard.committed and state.step % every == 0 and state.step < spec["steps"]
        if due and not membership.reform_pending:
            membership.request_reform()
        if spec.get("step_sleep"):
            time.sleep(spec["step_sleep"])


def serve_store(port_file: str) -> None:
    """A tiny process that only hosts the run's TCPStore (the store-host option measured
    in the docs); it publishes its port and sleeps until killed."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    Path(port_file + ".tmp").write_text(str(server.port))
    os.replace(port_file + ".tmp", port_file)
    while True:
        time.sleep(3600)


class Ranks:
    """Starts ranks from a forkserver that imported torch once, and kills what is left at
    the end (a test that fails midway must not leave ranks training)."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        # torch._dynamo too: building an optimizer imports it lazily (~800 modules, 1.6 s
        # here), which a starter that preloads only `torch` would pay in every child.
        preload = ["torch", "torch.distributed", "torch._dynamo", "fm9g.model.generations", __name__]
        self.context.set_forkserver_preload(preload)
        self.processes: list[BaseProcess] = []

    def start(self, spec: dict[str, Any], target: Any = None) -> BaseProcess:
        process = self.context.Process(target=target or run_rank, args=(spec,), daemon=True)
        process.start()
        self.processes.append(process)
        return process

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Kill every rank still running and forget them (the forkserver stays for the next test).

        `Process.kill` rather than `os.kill`: a rank's parent is the forkserver, which reaps it
        the moment it exits, so its pid can vanish between `is_alive()` and the signal; the
        list is cleared even if something raises, or the next test would index stale ranks."""
        try:
            for process in self.processes:
                process.kill()
                process.join(5)
        finally:
            self.processes.clear()


def wait_for(path: Path, predicate: Any, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Poll a rank's log until `predicate(records)` holds; the records then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = read_log(path)
        if predicate(records):
            return records
        time.sleep(0.02)
    raise TimeoutError(f"{path}: condition not met within {timeout_s} s; last records: {read_log(path)[-5:]}")
