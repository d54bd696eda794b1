"""Fixtures of the integration tests."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder under $HOME for a run's directory.  The test cluster's nodes share
    this machine's filesystem, so any path is "shared storage"; pytest's own tmp is not
    used because it may be cleaned while a job still writes."""
    prefix = f"fm9g-{request.module.__name__.rsplit('.', 1)[-1].removeprefix('test_')}-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=Path.home()))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)
