"""`list_runs`: the runs the TUI can show, with their overall status, read from each
run's state.db (never from Slurm)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.status import find_runs, overall


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    status: str


def runs_root_of(target: Path) -> Path:
    """The directory whose runs are listed: a run directory's parent, else the directory itself."""
    target = Path(target).resolve()
    return target.parent if (target / "config.yaml").exists() else target


def summarize(run: RunDir) -> RunSummary:
    status = "NEW"
    if run.state_db.exists():
        try:
            store = StateStore(run.state_db, readonly=True)
            try:
                stages = store.stages()
            finally:
                store.close()
            status = overall(stages) if stages else "NEW"
        except sqlite3.Error:
            status = "UNKNOWN"
    return RunSummary(name=run.name, path=run.root, status=status)


def list_runs(root: Path) -> list[RunSummary]:
    """Every run under `root`, by name."""
    return [summarize(run) for run in find_runs(Path(root))]
