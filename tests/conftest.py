"""Shared fixtures and options for the whole suite."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/* from the current renderer instead of comparing")


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
            diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "rendered"))
            pytest.fail(f"rendered script differs from {path} (rerun with --regen-golden if intended):\n{diff}")

    return check
