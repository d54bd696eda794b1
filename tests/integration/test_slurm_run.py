"""Multi-node training on the real test Slurm cluster (tests/cluster/up.sh), from this host
acting as the login node: master and worker jobs joined by torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import runs

pytestmark = pytest.mark.cluster


def launch(root: Path, name: str, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return runs.run_tiny(root, name, *extra, executor="slurm", timeout=timeout)


def squeue_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def test_four_nodes_train_to_completion(shared_tmp: Path) -> None:
    result = launch(shared_tmp, "four", "--nodes", "4", "--set", "train.train_iters=20", "--set", "train.save_iters=10")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = shared_tmp / "four"
    assert "world_size=4" in (run / "logs" / "train" / "master0-a1.out").read_text()
    for rank in range(1, 4):
        assert (run / "logs" / "train" / f"worker{rank}-a1.out").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "20"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 20
    status = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "status", str(run), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    facts = json.loads(status.stdout)["runs"][0]
    nodes = {job["node"] for job in facts["jobs"] if job["stage"] == "train"}
    assert len(nodes) == 4 and all(node.startswith("node") for node in nodes)
    assert facts["progress"]["step"] == 20


def test_dry_run_submits_nothing(shared_tmp: Path) -> None:
    before = squeue_ids()
    result = launch(shared_tmp, "dry", "--nodes", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    scripts = sorted((shared_tmp / "dry" / "dry-run" / "scripts").iterdir())
    assert len(scripts) == 9  # 2 datasets x (shard array, merge), the tokenizer, master + 3 workers
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert squeue_ids() == before


def test_hostile_run_name(shared_tmp: Path) -> None:
    name = "x $(touch PWNED) `id` \"q' ;"
    result = launch(
        shared_tmp,
        name,
        "--nodes",
        "2",
        "--set",
        "train.train_iters=6",
        "--set",
        "train.save_iters=3",
        "--set",
        "train.warmup_iters=2",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (shared_tmp / name / "control" / "DONE").exists()
    assert not list(shared_tmp.rglob("PWNED")) and not (Path.home() / "PWNED").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("cluster.partition=nosuchpartition", "nosuchpartition"),
        ("cluster.nodes=9", "9"),
        ("cluster.gpus_per_node=8", "gpu"),
    ],
)
def test_rejected_before_submission(shared_tmp: Path, override: str, expected: str) -> None:
    before = squeue_ids()
    result = launch(shared_tmp, "bad", "--set", override, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "error" in result.stderr
    assert squeue_ids() == before
    assert not (shared_tmp / "bad" / "logs" / "train").exists()


def test_master_lands_on_another_node(shared_tmp: Path) -> None:
    blocker = (
        subprocess.run(
            ["sbatch", "--parsable", "-N1", "-w", "node1", "-o", "/dev/null", "--wrap=sleep 600"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        runs.wait_for(
            lambda: (
                "R"
                in subprocess.run(["squeue", "-h", "-j", blocker, "-o", "%t"], capture_output=True, text=True).stdout
            ),
            60,
            "the blocker to start on node1",
        )
        result = launch(
            shared_tmp,
            "moved",
            "--nodes",
            "2",
            "--set",
            "train.train_iters=6",
            "--set",
            "train.save_iters=3",
            "--set",
            "train.warmup_iters=2",
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        endpoint = json.loads((shared_tmp / "moved" / "rendezvous" / "endpoint.json").read_text())
        assert endpoint["host"] != "node1" and endpoint["host"].startswith("node")
    finally:
        subprocess.run(["scancel", blocker], check=False)
