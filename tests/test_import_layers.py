"""The import-layers contract: imports point down only.

    orchestrator  ->  launchers  ->  model  ->  data  ->  rundir

A module may import its own package and any package below it, never one above.  Lazy
imports inside functions count too: a cycle hidden in a function is still a cycle.
The compute side (launchers, model, data) therefore never imports fm9g.orchestrator,
which holds the Slurm client."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["rundir", "data", "model", "launchers", "orchestrator"]  # bottom first


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level fm9g package) of every fm9g import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fm9g" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down_only(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1]) | {"templates"}
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports fm9g.{package}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for line, package in imported_packages(path)
        if package not in allowed
    ]
    assert not upward, f"fm9g.{layer} may import only {sorted(allowed)}:\n" + "\n".join(upward)


def test_node_agent_loads_no_login_side_code() -> None:
    """The agent starts on every node at every restart: no jinja2, no Slurm client."""
    code = (
        "import sys, fm9g.launchers.node_agent; "
        "print(sorted(m for m in sys.modules if m == 'jinja2' or m.startswith('fm9g.orchestrator')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
