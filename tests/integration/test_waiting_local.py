"""Waiting node-seconds on a real two-node local run: the training stage's `stage_end`
event carries it, and `status --json` reports the same figure once the stage ended."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import runs

pytestmark = pytest.mark.slow  # trains the tiny model through the CLI


def test_stage_end_and_status_report_waiting_node_seconds(tmp_path: Path) -> None:
    args = ("--nodes", "2", "--yes", "--set", "train.train_iters=10", "--set", "train.save_iters=10")
    result = runs.run_tiny(tmp_path / "runs", "w", *args, executor="local", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "w"
    (end,) = [event for event in runs.events(run, "stage_end") if event.stage == "train"]
    recorded = end.data["waiting_node_s"]
    assert isinstance(recorded, float) and recorded >= 0
    status = subprocess.run(runs.cli("status", "--json", str(run)), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    (facts,) = json.loads(status.stdout)["runs"]
    # Every node job has ended: the figure no longer grows, so both read the same rows alike.
    assert facts["waiting_node_seconds"] == pytest.approx(recorded)
    assert facts["supervisor_state"] is None  # a login supervisor
