"""Fixtures for the Slurm layer: the recorded command output, and a live client (for
tests marked `cluster`, which the root conftest skips when the test cluster is not up)."""

from __future__ import annotations

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


@pytest.fixture
def slurm() -> SlurmClient:
    """A live client with its own call counter."""
    return SlurmClient(counter=CallCounter(), timeout_s=30)
