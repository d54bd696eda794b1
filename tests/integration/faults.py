"""Fault injections on the real test cluster, and the helpers the fault tests and the
recovery benchmark share: start a tiny 4-node run, wait for a step, break something,
read the loss curve back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "pretrain.yaml"
CLUSTER = REPO / "tests" / "cluster"

# The run every scenario uses; the reference run is the same without a fault.  Two
# nodes keep the suite short on 2 cores and leave the test bed's other nodes spare, so a
# crashed node's replacement lands elsewhere, as on a real cluster.
RUN_ARGS = ("--nodes", "2", "--set", "train.train_iters=36", "--set", "train.save_iters=4",
            "--set", "train.warmup_iters=4", "--set", "train.step_sleep=0.25", "--set", "train.log_iters=1",
            "--set", "supervise.poll_interval=0.5", "--set", "rendezvous.join_timeout=120",
            "--set", "supervise.hang_timeout=240")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fm9g.orchestrator.cli", *args]


def start_run(root: Path, name: str, *extra: str, reuse: Path | None = None) -> subprocess.Popen[str]:
    """Start a tiny 4-node run; `reuse` points at a finished run whose indexed data and
    tokenizer it takes (skipping those stages keeps each scenario short)."""
    shared: tuple[str, ...] = ()
    if reuse is not None:
        shared = ("--set", f"data.dataset_config={reuse / 'mixture.json'}",
                  "--set", f"data.tokenizer_path={reuse / 'tokenizer' / 'tokenizer.model'}")
    argv = cli("pretrain", "--config", str(TINY), "--executor", "slurm", "--name", name, "--no-progress",
               "--set", f"run_root={root}", *RUN_ARGS, *shared, *extra)
    log = open(root / f"{name}.supervisor.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate: Callable[[], object], limit: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


def losses(run: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (re-done after a failure) keeps its last value."""
    curve: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        curve[int(record["step"])] = float(record["loss"])
    return curve


def last_step(run: Path) -> int:
    try:
        return max(losses(run))
    except (OSError, ValueError):
        return 0


def checkpoint_step(run: Path) -> int:
    try:
        return int((run / "checkpoints" / "latest").read_text())
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class LiveJob:
    job_id: str
    node: str
    role: str
    node_rank: int


def live_jobs(run: Path) -> list[LiveJob]:
    from fm9g.orchestrator.state import StateStore

    store = StateStore(run / "state.db", readonly=True)
    try:
        rows = store.jobs("train", live_only=True)
    finally:
        store.close()
    return [LiveJob(str(r.job_id), r.node, r.role, r.node_rank) for r in rows if r.job_id and r.state == "RUNNING"]


def job_of(run: Path, role: str) -> LiveJob:
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


def crash_node(run: Path, role: str) -> str:
    """Link down first (so nothing says goodbye), then kill everything in the node."""
    job = job_of(run, role)
    namespace = namespace_of(job.node)
    subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return f"crashed {job.node} ({role} job {job.job_id})"


def repair_nodes() -> None:
    """Bring crashed nodes back: links up, slurmd restarted (up.sh is idempotent)."""
    for k in range(1, 5):
        subprocess.run(["ip", "-n", f"fm9g-node{k}", "link", "set", "eth0", "up"], check=False)
    subprocess.run(["bash", str(CLUSTER / "up.sh")], check=True, capture_output=True)
    for k in range(1, 5):
        subprocess.run(["scontrol", "update", f"NodeName=node{k}", "State=RESUME"], capture_output=True)


def signal_walltime(run: Path) -> str:
    job = job_of(run, "master")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True)
    return f"USR1 to the batch shell of master job {job.job_id}"


def restart_slurmctld() -> str:
    state = Path(os.environ.get("FM9G_CLUSTER_STATE", "/var/lib/fm9g-testcluster"))
    pid = int((state / "pids" / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(3)  # polls fail meanwhile: the supervisor must treat them as unknown
    subprocess.run(["bash", str(CLUSTER / "up.sh")], check=True, capture_output=True)
    return f"killed slurmctld {pid} and started it again"



def freeze_trainer(run: Path) -> str:
    """SIGSTOP a worker's trainer: alive but silent, the hang the watchdog exists for."""
    return signal_trainer(run, signal.SIGSTOP)
