"""A run whose filesystem fills up (issue 18 #4): the failure is recorded with the full
filesystem named, nothing dies with a traceback, and `resume` finishes the run once
space is freed.  A small tmpfs plays the full disk (needs root to mount)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import runs
from tests.helpers.tmpfs import mounted_tmpfs

pytestmark = pytest.mark.slow


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "fs", "3m") as mount:
        yield mount


def test_full_disk_is_a_recorded_failure_and_resume_finishes(small_fs: Path) -> None:
    root = small_fs / "runs"
    extra = ("--set", "train.train_iters=12", "--set", "train.save_iters=4", "--set", "train.warmup_iters=2")
    first = runs.run_tiny(root, "full", *extra, timeout=600)
    run = root / "full"
    assert first.returncode != 0
    assert "Traceback" not in first.stderr + first.stdout
    failures = runs.events(run, "failure")
    assert failures and failures[-1].data["klass"] == "do-not-retry"
    assert "full" in failures[-1].message
    stage = runs.stage(run, "train")
    assert stage is not None and stage.status.value == "FAILED" and "full" in stage.detail

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = subprocess.run(runs.cli("resume", str(run), "--no-progress"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert runs.checkpoint_step(run) == 12
    stage = runs.stage(run, "train")
    assert stage is not None and stage.status.value == "COMPLETED"
