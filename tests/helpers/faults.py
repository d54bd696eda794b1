"""Fault injections on the real test cluster, and the tiny 2-node run the fault tests and
the recovery benchmark break: start it, wait for a step, break something."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.runs import REPO, LiveJob, live_jobs, losses, start_tiny

CLUSTER = REPO / "tests" / "cluster"

# The run every scenario uses; the reference run is the same without a fault.  Two
# nodes keep the suite short on 2 cores and leave the test bed's other nodes spare, so a
# crashed node's replacement lands elsewhere, as on a real cluster.
RUN_ARGS = (
    "--nodes",
    "2",
    "--set",
    "train.train_iters=36",
    "--set",
    "train.save_iters=4",
    "--set",
    "train.warmup_iters=4",
    "--set",
    "train.step_sleep=0.25",
    "--set",
    "rendezvous.join_timeout=120",
    "--set",
    "supervise.hang_timeout=240",
)


def start_run(root: Path, name: str, *extra: str, reuse: Path | None = None) -> subprocess.Popen[str]:
    """Start the tiny 2-node Slurm run `name` under `root`, its supervisor's output in
    `root/<name>.supervisor.log`; `reuse` points at a finished run whose indexed data and
    tokenizer it takes (skipping those stages keeps each scenario short)."""
    shared: tuple[str, ...] = ()
    if reuse is not None:
        shared = (
            "--set",
            f"data.dataset_config={reuse / 'mixture.json'}",
            "--set",
            f"data.tokenizer_path={reuse / 'tokenizer' / 'tokenizer.model'}",
        )
    return start_tiny(
        root, name, *RUN_ARGS, *shared, *extra, executor="slurm", log=root / f"{name}.supervisor.log", new_session=True
    )


def reference_curve(root: Path, *extra: str, steps: int = 36) -> dict[int, float]:
    """Run the scenarios' run uninterrupted as `root/reference` (with `extra` settings) and
    return its loss per step; the fault scenarios reuse its indexes and tokenizer."""
    proc = start_run(root, "reference", *extra)
    assert proc.wait(timeout=900) == 0, (root / "reference.supervisor.log").read_text()[-3000:]
    curve = losses(root / "reference")
    assert sorted(curve) == list(range(1, steps + 1))
    return curve


def job_of(run: Path, role: str) -> LiveJob:
    """The newest RUNNING job of `role` that has a node."""
    jobs = [j for j in live_jobs(run) if j.role == role and j.node]
    assert jobs, f"no running {role} job"
    return jobs[-1]


def namespace_of(node: str) -> str:
    return f"fm9g-{node}"


def trainer_pid(run: Path, node_rank: int) -> int:
    beat = json.loads((run / "heartbeats" / f"node{node_rank}.json").read_text())
    return int(beat["pid"])


# ---------------------------------------------------------------------------- injections


def scancel_worker(run: Path) -> str:
    job = job_of(run, "worker")
    subprocess.run(["scancel", job.job_id], check=True)
    return f"scancel worker job {job.job_id}"


def scancel_master(run: Path) -> str:
    job = job_of(run, "master")
    subprocess.run(["scancel", job.job_id], check=True)
    return f"scancel master job {job.job_id}"


def signal_trainer(run: Path, sig: signal.Signals) -> str:
    """Send `sig` to a worker node's local-rank-0 trainer (its pid is in the heartbeat)."""
    job = job_of(run, "worker")
    pid = trainer_pid(run, job.node_rank)
    os.kill(pid, sig)
    return f"{sig.name} to trainer pid {pid} on {job.node}"


def kill_trainer(run: Path) -> str:
    return signal_trainer(run, signal.SIGKILL)


def freeze_trainer(run: Path) -> str:
    """SIGSTOP a worker's trainer: alive but silent, the hang the watchdog exists for."""
    return signal_trainer(run, signal.SIGSTOP)


def crash_node(run: Path, role: str) -> str:
    """Link down first (so nothing says goodbye), then kill everything in the node."""
    return crash_job(job_of(run, role))


def crash_job(job: LiveJob) -> str:
    """Crash the node `job` runs on: link down, then every process in it killed."""
    namespace = namespace_of(job.node)
    subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return f"crashed {job.node} ({job.role} job {job.job_id})"


def repair_nodes() -> None:
    """Bring crashed nodes back: links up, slurmd restarted (up.sh is idempotent)."""
    namespaces = node_namespaces()  # every node the cluster was brought up with (NODES)
    for namespace in namespaces:
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "up"], check=False)
    nodes = {"NODES": str(len(namespaces))} if namespaces else {}
    subprocess.run(["bash", str(CLUSTER / "up.sh")], check=True, capture_output=True, env={**os.environ, **nodes})
    for namespace in namespaces:
        node = namespace.removeprefix("fm9g-")
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True)
    # Until Slurm takes every node again: the next scenario may need all of them at once
    # (a spare), and a node still DOWN would leave its job queued past the run's end.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all_nodes_usable():
        time.sleep(1)


def all_nodes_usable() -> bool:
    """Every node responding and idle, allocated or mixed (sinfo), none down or drained."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.split()
    return bool(out) and all(state in ("idle", "alloc", "mix") for state in out)


def signal_walltime(run: Path) -> str:
    job = job_of(run, "master")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True)
    return f"USR1 to the batch shell of master job {job.job_id}"


def restart_slurmctld(sig: signal.Signals = signal.SIGKILL) -> str:
    """Stop slurmctld and start it again; polls fail meanwhile, and the supervisor must
    treat them as unknown.  SIGKILL is a crash: slurmctld forgets jobs it had not saved
    yet.  SIGTERM is an operator's restart: it saves its state first."""
    state = Path(os.environ.get("FM9G_CLUSTER_STATE", "/var/lib/fm9g-testcluster"))
    pid = int((state / "pids" / "slurmctld.pid").read_text())
    os.kill(pid, sig)
    for _ in range(300):  # until it is gone (a SIGTERM'd controller saves state first)
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    time.sleep(3)
    subprocess.run(["bash", str(CLUSTER / "up.sh")], check=True, capture_output=True)
    return f"stopped slurmctld {pid} ({sig.name}) and started it again"


# ---------------------------------------------------------------------------- network


def node_namespaces() -> list[str]:
    """The network namespaces of the test cluster's nodes (fm9g-node1...)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0] for line in listing.splitlines() if line.startswith("fm9g-node"))


@contextlib.contextmanager
def blocked_tcp_port(port: int) -> Iterator[list[str]]:
    """Drop every TCP packet sent to `port` from any compute node, as a firewall between
    nodes would (the connection times out, no RST), and restore the nodes on exit.

    tc, not iptables: this kernel has neither iptables nor tc's drop action, but it has
    htb and u32, so matching packets go to a class whose queue holds nothing (pfifo
    limit 0).  Slurm's own traffic (other ports) is untouched."""
    namespaces = node_namespaces()
    done: list[str] = []
    try:
        for ns in namespaces:
            tc = ["tc", "-n", ns]
            subprocess.run(
                [*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1"], check=True
            )
            done.append(ns)
            subprocess.run(
                [*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit"],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:2", "htb", "rate", "8bit"],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*tc, "qdisc", "add", "dev", "eth0", "parent", "1:2", "handle", "20:", "pfifo", "limit", "0"],
                check=True,
            )
            match = ["match", "ip", "protocol", "6", "0xff", "match", "ip", "dport", str(port), "0xffff"]
            subprocess.run(
                [*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", *match]
                + ["flowid", "1:2"],
                check=True,
            )
        yield namespaces
    finally:
        for ns in done:
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], check=False, capture_output=True)
