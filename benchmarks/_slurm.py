"""Helpers the Slurm benchmarks share: a tiny-run launcher and wall-clock waits.

The run is launched with the tests' helper (tests/helpers/runs.py), so a benchmark and a
test start the same run; importing this module puts the repository root on sys.path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers.runs import start_tiny  # noqa: E402 - needs REPO on sys.path


def start_tiny_run(root: Path, name: str, nodes: int, iters: int, *extra: str) -> subprocess.Popen[str]:
    """The tiny pretraining on the test cluster, with the config's own supervisor tick
    (what a benchmark measures); output in a pipe."""
    return start_tiny(
        root,
        name,
        "--nodes",
        str(nodes),
        "--set",
        f"train.train_iters={iters}",
        "--set",
        "train.warmup_iters=0.1",
        *extra,
        executor="slurm",
        poll_interval=None,
    )


def first_step_time(run: Path) -> float | None:
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            return float(record["time"])
    except (OSError, ValueError, KeyError):
        return None
    return None
