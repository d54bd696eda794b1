"""`fm9g-launch status --failures`: the recovery timeline, from the state database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text


def test_failures_table_shows_each_phase(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "runs" / "r").make()
    write_text(run.config, cfg.dump(cfg.RunConfig()))
    store = StateStore(run.state_db)
    store.upsert_stage("train", "train")
    phases = {"detected": 100.0, "resubmitted": 100.2, "allocated": 100.7, "rendezvous": 104.0, "first_step": 106.5}
    store.event("recovery", "node 2 recovered in 6.5s", stage="train", node_rank=2, phases=phases)
    store.close()
    out = subprocess.run(
        [sys.executable, "-m", "fm9g.orchestrator.cli", "status", str(run.root), "--failures"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    ).stdout
    row = next(line for line in out.splitlines() if line.strip().startswith("2"))
    assert row.split()[1:] == ["0.2", "0.7", "4.0", "6.5", "6.5s"]
