"""In-process recovery on the real test cluster (supervise.on_node_loss wait/shrink): a
2-node run, its store job, and a fault mid-run.  Each run must complete with every step
trained once and the loss per step of an uninterrupted run with the same settings; the
survivors keep their processes (their trainer uid never changes), and what happened is
read back from state.db."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fm9g.orchestrator.state import StageStatus
from tests.helpers import faults, runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 36  # faults.RUN_ARGS
INPROC = ("--set", "supervise.inproc_hang_timeout=2")


def policy(name: str, *extra: str) -> tuple[str, ...]:
    return ("--set", f"supervise.on_node_loss={name}", *INPROC, *extra)


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fm9g-inproc-", dir=Path.home()))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[int, float]:
    return faults.reference_curve(root, *policy("wait"), steps=STEPS)


def start(root: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    proc = faults.start_run(root, name, *extra, reuse=root / "reference")
    run = root / name
    runs.wait_for(lambda: runs.last_step(run) >= 8, 600, f"{name} to pass step 8")
    return proc, run


def finish(proc: subprocess.Popen[str], root: Path, name: str, timeout: float = 900) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    assert code == 0, (root / f"{name}.supervisor.log").read_text()[-4000:]
    stage = runs.stage(root / name)
    assert stage is not None and stage.status is StageStatus.COMPLETED


def check_curve(run: Path, reference: dict[int, float]) -> None:
    assert [m["step"] for m in runs.metrics(run)] == list(range(1, STEPS + 1)), "each step logged once, in order"
    curve = runs.losses(run)
    worst = max(abs(curve[step] - reference[step]) for step in reference)
    assert worst <= 1e-5, f"loss differs from the uninterrupted run by {worst}"


def inproc(run: Path, name: str) -> list[dict]:
    return [event.data for event in runs.events(run, "inproc") if event.data.get("event") == name]


def trainers_of(run: Path, node_rank: int) -> set[str]:
    """Every trainer process uid node `node_rank` ran (one per start)."""
    return {e["uid"] for e in inproc(run, "arrived") if e["node_rank"] == node_rank}


def wait_for_spare(run: Path) -> int:
    """The node rank of the job whose ranks wait as the spare, once they do: the third node
    job may start, and import torch, well after the other two train."""
    found = runs.wait_for(lambda: runs.inproc_lines(run, "spare"), 300, "a rank waiting as the spare")
    return int(found[0]["node_rank"])


def test_spare_lost_while_idle_touches_nothing(root: Path, reference: dict[int, float]) -> None:
    proc, run = start(root, "spare_lost", *policy("wait", "--set", "cluster.spares=1"))
    spare = wait_for_spare(run)
    job = next(job for job in runs.live_jobs(run) if job.node_rank == spare)
    subprocess.run(["scancel", job.job_id], check=True)
    finish(proc, root, "spare_lost")
    check_curve(run, reference)
    assert inproc(run, "detected") == [], "no member noticed: the spare was not in the group"
    assert [s.node_rank for s in runs.submissions(run) if s.attempt > 1] == [spare]


def test_wait_scancel_worker(root: Path, reference: dict[int, float]) -> None:
    """The worker's job is cancelled: the master's trainer waits, warm, for the new job's
    rank, which gets the state from it; the master's process is never restarted."""
    proc, run = start(root, "wait_worker", *policy("wait"))
    faults.scancel_worker(run)
    finish(proc, root, "wait_worker")
    check_curve(run, reference)
    assert len(trainers_of(run, 0)) == 1, "the master's trainer kept its process"
    received = [e for e in inproc(run, "synced") if e["received"]]
    assert [e["node_rank"] for e in received] == [1]
    assert [(s.role, s.node_rank) for s in runs.submissions(run) if s.attempt > 1] == [("worker", 1)]


def test_shrink_scancel_master_goes_on_and_grows_back(root: Path, reference: dict[int, float]) -> None:
    """The master's job is cancelled (losing the master is an ordinary member loss: the
    store lives in its own job).  The worker trains on alone, both data slots, until the
    master's replacement joins; the curve is the uninterrupted one throughout."""
    proc, run = start(root, "shrink_master", *policy("shrink"))
    faults.scancel_master(run)
    finish(proc, root, "shrink_master")
    check_curve(run, reference)
    assert len(trainers_of(run, 1)) == 1, "the worker's trainer kept its process"
    sizes = [m["world_size"] for m in runs.metrics(run)]
    assert 1 in sizes and sizes[-1] == 2, "shrank to one rank, then grew back to two"
    assert {m["global_batch"] for m in runs.metrics(run)} == {runs.metrics(run)[0]["global_batch"]}


def test_wait_node_crash_with_a_spare(root: Path, reference: dict[int, float]) -> None:
    """A member node's link goes down and everything on it dies: no socket error reaches
    the others.  They give up on it at the hang timeout, the warm spare takes its place,
    and the supervisor cancels the dead node's job on the in-band report, without waiting
    for Slurm to call it NODE_FAIL."""
    proc, run = start(root, "crash_spare", *policy("wait", "--set", "cluster.spares=1"))
    spare = wait_for_spare(run)
    member = min({1, 2} - {spare})
    crashed = next(job for job in runs.live_jobs(run) if job.node_rank == member)
    try:
        faults.crash_job(crashed)
        finish(proc, root, "crash_spare", timeout=1200)
    finally:
        faults.repair_nodes()
    check_curve(run, reference)
    received = [e for e in inproc(run, "synced") if e["received"]]
    assert [e["node_rank"] for e in received] == [spare], "the spare was promoted"
    assert [e.data["node_rank"] for e in runs.events(run, "node_silent")] == [member]


def test_supervisor_killed_during_a_recovery(root: Path, reference: dict[int, float]) -> None:
    """Under shrink, the supervisor dies, then the worker's job is cancelled: the master
    trains on alone with no supervisor at all (the store job is not the supervisor's).
    `resume` then adopts the live jobs and replaces the worker, which grows the group back."""
    proc, run = start(root, "no_supervisor", *policy("shrink"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    faults.scancel_worker(run)
    before = runs.last_step(run)
    runs.wait_for(lambda: runs.last_step(run) >= before + 5, 120, "steps with no supervisor")
    resumed = subprocess.run(runs.cli("resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    check_curve(run, reference)
    assert len(trainers_of(run, 0)) == 1, "the master's trainer kept its process throughout"
    assert [(s.role, s.node_rank) for s in runs.submissions(run) if s.attempt > 1] == [("worker", 1)]


def trainer_pid(run: Path, node_rank: int) -> int:
    """The pid of node `node_rank`'s newest trainer process (its events file is named by it)."""
    files = sorted((run / "events" / "inproc").glob(f"n{node_rank}r0p*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert files, f"no trainer of node {node_rank} has written events yet"
    return int(files[-1].stem.rsplit("p", 1)[1])


def test_wait_two_faults_inside_one_recovery(root: Path, reference: dict[int, float]) -> None:
    """The worker's trainer is killed, then its replacement too while it joins: the agent
    restarts the rank each time, alone; the master's trainer waits throughout."""
    proc, run = start(root, "two_faults", *policy("wait"))
    os.kill(trainer_pid(run, 1), signal.SIGKILL)
    first = trainer_pid(run, 1)
    runs.wait_for(lambda: trainer_pid(run, 1) != first, 60, "the restarted rank")
    os.kill(trainer_pid(run, 1), signal.SIGKILL)
    finish(proc, root, "two_faults")
    check_curve(run, reference)
    assert len(trainers_of(run, 0)) == 1
    assert runs.failures(run) == [], "no job failed: the agent restarted the rank twice"
    recoveries = runs.events(run, "inproc")
    assert len([e for e in recoveries if e.data.get("event") == "rank_restart"]) == 2


def test_shrink_hung_rank(root: Path, reference: dict[int, float]) -> None:
    """SIGSTOP of the worker's trainer: declared hung after inproc_hang_timeout and killed
    by its own agent, which starts it again; the master went on alone meanwhile."""
    proc, run = start(root, "hang", *policy("shrink"))
    hung = trainer_pid(run, 1)
    os.kill(hung, signal.SIGSTOP)
    finish(proc, root, "hang")
    check_curve(run, reference)
    assert [e["pid"] for e in inproc(run, "killed_lost")] == [hung]
    assert len(trainers_of(run, 0)) == 1


def test_shrink_node_crash_without_a_spare(root: Path, reference: dict[int, float]) -> None:
    """The worker's node crashes (link down): the master gives up on it at the hang
    timeout and trains on alone; the supervisor replaces the node on the in-band report."""
    proc, run = start(root, "crash_shrink", *policy("shrink"))
    crashed = faults.job_of(run, "worker")
    try:
        faults.crash_job(crashed)
        finish(proc, root, "crash_shrink", timeout=1200)
    finally:
        faults.repair_nodes()
    check_curve(run, reference)
    assert len(trainers_of(run, 0)) == 1
    assert [e.data["job_id"] for e in runs.events(run, "node_silent")] == [crashed.job_id]


def test_wait_fault_during_a_checkpoint_save(root: Path, reference: dict[int, float]) -> None:
    """A checkpoint every step, and the saver (rank 0, on the master) killed: no checkpoint
    is ever left without its marker, and the replacement on its slot saves the rest."""
    proc, run = start(root, "save_fault", *policy("wait", "--set", "train.save_iters=1"))
    os.kill(trainer_pid(run, 0), signal.SIGKILL)
    finish(proc, root, "save_fault")
    check_curve(run, reference)
    assert (run / "checkpoints" / "latest").read_text().strip() == str(STEPS)
    complete = [p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.name.isdigit()]
    assert complete and all((p / "COMPLETE").exists() for p in complete)
    (weights,) = (run / "checkpoints" / str(STEPS)).glob(f"*-{STEPS}.pt")
    assert "input_embedding.weight" in torch.load(weights, map_location="cpu", weights_only=False)
