"""Supervisor decisions that need the real cluster's answers (sinfo)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.slurm import SlurmExecutor
from fm9g.orchestrator.jobs import JobTracker
from fm9g.orchestrator.render import ScriptRenderer
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.train_policy import TrainPolicy
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text

pytestmark = pytest.mark.cluster


def supervisor(tmp_path: Path, nodes: int) -> TrainPolicy:
    """The train stage's policy over the real SlurmExecutor (nothing is submitted here)."""
    run = RunDir.of(tmp_path / "run").make()
    config, _ = cfg.load(None, [f"cluster.nodes={nodes}", "executor=slurm"])
    write_text(run.config, cfg.dump(config))
    store = StateStore(run.state_db)
    renderer = ScriptRenderer(
        run_name=run.name, run_dir=str(run.root), cluster=config.cluster, python="python3", config_hash="0" * 12
    )
    return TrainPolicy(run, config, store, JobTracker(run, store, SlurmExecutor(), renderer))


def test_excluded_nodes_are_checked_against_sinfo(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, nodes=2)
    later = time.time() + 3600
    sup.store.set_meta("excluded", {"node3": later, "ghost7": later, "node4": time.time() - 1})
    # ghost7 is no node of this cluster; node4's exclusion has expired.
    assert sup.cluster_config().exclude == ["node3"]


def test_exclusions_that_leave_too_few_nodes_are_dropped(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, nodes=4)
    sup.store.set_meta("excluded", {"node2": time.time() + 3600})
    assert sup.cluster_config().exclude == []
    # The dropped exclusion is recorded: which nodes, and that it was not applied.
    assert [(e.data["nodes"], e.data["applied"]) for e in sup.store.events("exclude")] == [(["node2"], False)]
