"""benchmarks/gpu_check.sh in its dry mode: end to end on the CPU, every GPU step reported as
skipped with the reason, the CPU side of each step run for real, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GPU_STEPS = ("gpu-tests", "mfu", "train-torch", "train-bmtrain", "vllm")


@pytest.mark.slow  # about a minute: pytest collection, one gpu_mfu step, two short training runs
def test_dry_mode_runs_end_to_end_and_skips_every_gpu_step(tmp_path: Path) -> None:
    out = tmp_path / "check"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = (out / "report.md").read_text()
    assert result.returncode == 0, report + result.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| ")
    }
    reason = "skipped: --dry" if torch.cuda.is_available() else "skipped: no CUDA"
    assert all(rows[step] == reason for step in GPU_STEPS), rows
    # The CPU side of each GPU step ran and passed, with its figure in the report.
    assert all(rows[step] == "ok" for step in ("environment", "dry-gpu-tests", "dry-mfu", "dry-train-torch")), rows
    assert "tests collected" in report and "gpu_mfu --dry: one step of tiny" in report
    assert "resume max abs loss diff 0;" in report  # gloo fp32: the resumed run repeats the straight one
    assert "every step that ran passed" in report


def test_a_failing_step_is_reported_with_its_log_and_fails_the_check(tmp_path: Path) -> None:
    out = tmp_path / "check"
    # A python that cannot import torch: the environment step fails, the report says so, exit 1.
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 3\n")
    broken.chmod(0o755)
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry", "--out", str(out), "--budget", "40"],
        cwd=REPO,
        env={**os.environ, "PYTHON": str(broken)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = (out / "report.md").read_text()
    assert result.returncode == 1
    assert "| environment | FAILED: exit 3 |" in report and "no torch here" in report
    assert "some steps FAILED" in report
