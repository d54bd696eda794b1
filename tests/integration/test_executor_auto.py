"""issue 15, done when: on the test cluster `fm9g-launch pretrain --nodes 2 --config
examples/tiny/pretrain.yaml`, with no executor named, runs on Slurm and says so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.choose import EVENT
from fm9g.orchestrator.state import StageStatus
from fm9g.rundir import config as config_mod
from tests.helpers import runs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_no_executor_named_runs_on_slurm(shared_tmp: Path) -> None:
    extra = (
        "--nodes",
        "2",
        "--set",
        "train.train_iters=6",
        "--set",
        "train.save_iters=3",
        "--set",
        "train.warmup_iters=2",
    )
    result = runs.run_tiny(shared_tmp, "auto", *extra, executor=None, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = shared_tmp / "auto"
    [choice] = runs.events(run, EVENT)
    assert (choice.data["chosen"], choice.data["requested"]) == ("slurm", "auto")
    assert "scontrol ping" in choice.data["why"]
    assert config_mod.load_resolved(run / "config.yaml").executor == "slurm"
    with runs.state(run) as store:
        assert store.meta("executor") == "slurm"
        train = store.jobs("train")
    ids = {str(row.job_id) for row in train if row.job_id}
    assert ids and len(ids) == len(train)
    # Slurm's accounting knows every one of them (a local job id is a pid it has never seen).
    listed = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID", "-j", ",".join(sorted(ids))],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert set(listed) == ids
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED
