"""Supervisor decisions that need the real cluster's answers (sinfo)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.slurm import SlurmExecutor
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.supervisor import TrainSupervisor
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text

pytestmark = pytest.mark.cluster


def supervisor(tmp_path: Path, nodes: int) -> TrainSupervisor:
    run = RunDir.of(tmp_path / "run").make()
    config, _ = cfg.load(None, [f"cluster.nodes={nodes}", "executor=slurm"])
    write_text(run.config, cfg.dump(config))
    return TrainSupervisor(run, config, StateStore(run.state_db), SlurmExecutor(), say=lambda _: None,
                           repair=True, python="python3")


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
    assert any("fewer than 4 nodes" in e.message for e in sup.store.events("exclude"))
