"""Shared fixtures, options and markers for the whole suite.

Markers (declared in pyproject.toml):
- `cluster`: needs the test Slurm cluster.  Skipped here, with the reason, when it is not
  up, unless FM9G_REQUIRE_CLUSTER=1 (`make test` sets it), which makes that an error.
- `slow`: runs a real training run (a CLI subprocess, torchrun, a trained fixture) or
  otherwise takes more than ~20 s; `make unit` deselects it with `cluster`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.cluster import NOT_UP, cluster_up

REPO = Path(__file__).resolve().parents[1]

# Hermetic: a user's ~/.config/fm9g-launch/site.yaml must never change what a test
# launches.  Set, empty, it means "no site file" (fm9g.rundir.site); set here, at import,
# so the CLI subprocesses the tests start inherit it too.  Tests of the site file set
# their own path with monkeypatch.
os.environ["FM9G_LAUNCH_SITE"] = ""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite tests/golden/* from the current renderer instead of comparing",
    )


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: `make unit` never probes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_cluster = [item for item in items if item.get_closest_marker("cluster") is not None]
    if not needs_cluster or cluster_up():
        return
    if os.environ.get("FM9G_REQUIRE_CLUSTER") == "1":
        raise pytest.UsageError(f"FM9G_REQUIRE_CLUSTER=1 but {NOT_UP}")
    skip = pytest.mark.skip(reason=NOT_UP)
    for item in needs_cluster:
        item.add_marker(skip)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[Path, str], None]:
    """check(path, text): `text` must equal the golden file `path` (rewritten with --regen-golden)."""
    regen = bool(request.config.getoption("--regen-golden"))

    def check(path: Path, text: str) -> None:
        if regen or not path.exists():
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            if not regen:
                pytest.fail(f"{path} did not exist; written now, review and commit it")
            return
        expected = path.read_text()
        if text != expected:
            diff = "".join(
                difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered")
            )
            pytest.fail(f"rendered script differs from {path} (rerun with --regen-golden if intended):\n{diff}")

    return check
