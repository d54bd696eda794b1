"""Helpers the Slurm benchmarks share: a tiny-run launcher and wall-clock waits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny" / "pretrain.yaml"


def start_tiny_run(root: Path, name: str, nodes: int, iters: int, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "fm9g.orchestrator.cli", "pretrain", "--config", str(TINY), "--executor", "slurm",
            "--nodes", str(nodes), "--name", name, "--no-progress", "--set", f"run_root={root}",
            "--set", f"train.train_iters={iters}", "--set", "train.warmup_iters=0.1", "--set", "train.log_iters=1", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def first_step_time(run: Path) -> float | None:
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            return float(record["time"])
    except (OSError, ValueError, KeyError):
        return None
    return None
