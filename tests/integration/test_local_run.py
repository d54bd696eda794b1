"""End to end on this machine: the CLI, the local executor, two node agents joined by
torchrun (gloo), the real trainer, checkpoints, TensorBoard and resume.  What the
supervisor decided is read back from state.db, not from what it printed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fm9g.orchestrator.failures import FailureClass
from fm9g.orchestrator.state import StageStatus
from tests.helpers import runs

pytestmark = pytest.mark.slow  # each test trains the tiny model through the CLI


def test_two_node_rendezvous_trains_and_rerun_says_complete(tmp_path: Path) -> None:
    args = ("--nodes", "2", "--set", "train.train_iters=30", "--set", "train.save_iters=15")
    result = runs.run_tiny(tmp_path / "runs", "t", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "t"
    master_log = (run / "logs" / "train" / "master0-a1.out").read_text()
    assert "world_size=2" in master_log
    assert (run / "logs" / "train" / "worker1-a1.out").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 30 and summary["last_loss"] < summary["first_loss"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "30"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert [m["step"] for m in runs.metrics(run)] == list(range(1, 31))
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED
    assert [(s.role, s.node_rank, s.attempt) for s in runs.submissions(run)] == [("master", 0, 1), ("worker", 1, 1)]
    assert runs.failures(run) == []
    with runs.state(run) as store:
        recorded = store.events()
    # The same command on a finished run leaves it alone: no event, no job, no step.
    again = runs.run_tiny(tmp_path / "runs", "t", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    with runs.state(run) as store:
        assert store.events() == recorded
        assert store.stage("train") == stage
    assert [m["step"] for m in runs.metrics(run)] == list(range(1, 31))


def test_dry_run_renders_and_starts_nothing(tmp_path: Path) -> None:
    result = runs.run_tiny(tmp_path / "runs", "t", "--nodes", "2", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "t"
    scripts = sorted((run / "dry-run" / "scripts").iterdir())
    assert [p.name for p in scripts if p.name.startswith("train-")] == [
        "train-master0-a1.sbatch",
        "train-worker1-a1.sbatch",
    ]
    assert (run / "dry-run" / "config.yaml").exists()
    assert not (run / "state.db").exists() and not (run / "scripts").exists()
    for path in scripts:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_killed_node_fails_clearly_then_rerun_resumes_the_step_count(tmp_path: Path) -> None:
    from fm9g.orchestrator.executors.local import LocalExecutor

    run = tmp_path / "runs" / "t"
    args = ("--nodes", "2", "--set", "train.train_iters=40", "--set", "train.save_iters=5")
    proc = runs.start_tiny(tmp_path / "runs", "t", *args, "--set", "train.step_sleep=0.15", cwd=tmp_path)
    try:
        runs.wait_for(lambda: runs.checkpoint_step(run) >= 10, 300, "a checkpoint at step 10")
        killed = runs.live_job(run, "worker").job_id
        LocalExecutor().kill(killed)  # the node dies: every process, no goodbye
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    # The killed worker's end is recorded as its failure, and with local repair off the
    # stage stops FAILED instead of resubmitting anything.
    failed = [f for f in runs.failures(run) if f.job_id == killed]
    assert [(f.role, f.node_rank) for f in failed] == [("worker", 1)], output
    assert failed[0].klass != FailureClass.FATAL.value  # a lost node is worth a retry
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.FAILED
    assert [s.attempt for s in runs.submissions(run)] == [1, 1]
    step = runs.checkpoint_step(run)
    import torch

    state = torch.load(next((run / "checkpoints" / str(step)).glob(f"*-{step}.pt")), map_location="cpu")
    assert any(key.startswith("input_embedding") for key in state)
    seen_before = [m["step"] for m in runs.metrics(run)]
    again = runs.run_tiny(tmp_path / "runs", "t", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    # The same command restarts the failed stage (both nodes, attempt 2) from the checkpoint.
    assert len(runs.events(run, "restart")) == 1
    assert [(s.node_rank, s.attempt) for s in runs.submissions(run)][2:] == [(0, 2), (1, 2)]
    after = [m["step"] for m in runs.metrics(run)][len(seen_before) :]
    assert after == list(range(step + 1, 41))
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED
