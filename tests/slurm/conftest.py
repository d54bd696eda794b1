"""Fixtures for the Slurm layer: the recorded command output, and a live client that
skips the test when the test cluster (tests/cluster/up.sh) is not running."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fm9g.orchestrator.slurm.commands import CallCounter, SlurmClient

RECORDED = Path(__file__).parent / "recorded"


@pytest.fixture(scope="session")
def recorded() -> Callable[[str], str]:
    """Read one file saved by tests/cluster/record.sh."""

    def read(name: str) -> str:
        return (RECORDED / name).read_text(encoding="utf-8")

    return read


@pytest.fixture(scope="session")
def cluster_ready() -> None:
    """Skip unless `scontrol ping` reaches a controller."""
    if shutil.which("scontrol") is None:
        pytest.skip(
            "no Slurm client on PATH: bring up the test cluster with `sudo tests/cluster/up.sh`"
        )
    if not SlurmClient(timeout_s=15).ping():
        pytest.skip(
            "`scontrol ping` failed: the test cluster is not up (`sudo tests/cluster/up.sh`)"
        )


@pytest.fixture
def slurm(cluster_ready: None) -> SlurmClient:
    """A live client with its own call counter."""
    return SlurmClient(counter=CallCounter(), timeout_s=30)
