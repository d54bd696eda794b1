"""End to end on this machine: the CLI, the local executor, two node agents joined by
torchrun (gloo), the real trainer, checkpoints, TensorBoard and resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "pretrain.yaml"


def launch(tmp_path: Path, *extra: str, name: str = "t", background: bool = False) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fm9g.orchestrator.cli", "pretrain", "--config", str(TINY), "--name", name,
            "--no-progress", "--set", f"run_root={tmp_path / 'runs'}", "--set", "train.log_iters=1",
            "--set", "supervise.poll_interval=0.5", *extra]
    if background:
        return subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_two_node_rendezvous_trains_and_rerun_says_complete(tmp_path: Path) -> None:
    result = launch(tmp_path, "--nodes", "2", "--set", "train.train_iters=30", "--set", "train.save_iters=15")
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "t"
    master_log = (run / "logs" / "train" / "master0-a1.out").read_text()
    assert "world_size=2" in master_log
    assert (run / "logs" / "train" / "worker1-a1.out").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 30 and summary["last_loss"] < summary["first_loss"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "30"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert [m["step"] for m in metrics(run)] == list(range(1, 31))
    assert "is complete" in result.stdout
    again = launch(tmp_path, "--nodes", "2", "--set", "train.train_iters=30")
    assert isinstance(again, subprocess.CompletedProcess)
    assert again.returncode == 0 and "is complete" in again.stdout and "nothing to do" in again.stdout


def test_dry_run_renders_and_starts_nothing(tmp_path: Path) -> None:
    result = launch(tmp_path, "--nodes", "2", "--dry-run")
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stderr
    scripts = sorted((tmp_path / "runs" / "t" / "scripts").iterdir())
    assert [p.name for p in scripts] == ["train-master0-a1.sbatch", "train-worker1-a1.sbatch"]
    assert str(tmp_path / "runs" / "t" / "scripts") in result.stdout
    assert not (tmp_path / "runs" / "t" / "state.db").exists()
    for path in scripts:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def wait_for(predicate, limit: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def live_job(run: Path, role: str) -> str:
    from fm9g.orchestrator.state import StateStore

    store = StateStore(run / "state.db", readonly=True)
    try:
        rows = [r for r in store.jobs("train", live_only=True) if r.role == role and r.job_id]
    finally:
        store.close()
    assert rows, f"no live {role} job"
    return str(rows[-1].job_id)


def test_killed_node_fails_clearly_then_rerun_resumes_the_step_count(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "t"
    proc = launch(tmp_path, "--nodes", "2", "--set", "train.train_iters=40", "--set", "train.save_iters=5",
                  "--set", "train.step_sleep=0.15", background=True)
    assert isinstance(proc, subprocess.Popen)
    try:
        latest = run / "checkpoints" / "latest"
        wait_for(lambda: latest.exists() and int(latest.read_text()) >= 10, 300, "a checkpoint at step 10")
        from fm9g.orchestrator.executors.local import LocalExecutor

        LocalExecutor().kill(live_job(run, "worker"))  # the node dies: every process, no goodbye
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output
    assert "worker node 1" in output and "failed" in output and "run the same command again to resume" in output
    step = int((run / "checkpoints" / "latest").read_text())
    import torch

    state = torch.load(next((run / "checkpoints" / str(step)).glob("*-%d.pt" % step)), map_location="cpu")
    assert any(key.startswith("input_embedding") for key in state)
    seen_before = [m["step"] for m in metrics(run)]
    again = launch(tmp_path, "--nodes", "2", "--set", "train.train_iters=40", "--set", "train.save_iters=5")
    assert isinstance(again, subprocess.CompletedProcess)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"from checkpoint step {step}" in again.stdout
    after = [m["step"] for m in metrics(run)][len(seen_before):]
    assert after == list(range(step + 1, 41))
