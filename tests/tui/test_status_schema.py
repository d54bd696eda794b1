"""`fm9g-launch status --json` against docs/status-schema.md: the tables of the doc are
parsed into a spec, and real output must have exactly the documented keys, each of a
documented type."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.status import SCHEMA_VERSION
from fm9g.rundir.config import RunConfig, dump

from .conftest import DemoRun, add_inproc_events

DOC = Path(__file__).resolve().parents[2] / "docs" / "status-schema.md"
PRIMITIVES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "null": type(None),
}

Spec = dict[str, dict[str, str]]


def documented_spec(text: str) -> Spec:
    """{section: {key: type expression}} from the `key | type | meaning` table of every `## section`."""
    spec: Spec = {}
    section = None
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        is_row = line.startswith("|") and not line.startswith("|---")
        is_header = index + 1 < len(lines) and lines[index + 1].startswith("|---")
        if section and is_row and not is_header and len(cells) == 3:
            spec.setdefault(section, {})[cells[0]] = cells[1]
    return {name: keys for name, keys in spec.items() if name != "Versions"}


def check(value: Any, expression: str, spec: Spec, where: str) -> None:
    """Raise AssertionError unless `value` is of one of the alternatives of `expression`."""
    problems = []
    for alternative in (part.strip() for part in expression.split(" or ")):
        try:
            check_one(value, alternative, spec, where)
            return
        except AssertionError as exc:
            problems.append(str(exc))
    raise AssertionError(f"{where}: {value!r:.80} is not {expression} ({'; '.join(problems)})")


def check_one(value: Any, alternative: str, spec: Spec, where: str) -> None:
    if alternative.startswith("array of "):
        assert isinstance(value, list), "not an array"
        for index, item in enumerate(value):
            check(item, alternative[len("array of ") :], spec, f"{where}[{index}]")
    elif alternative in spec:
        assert isinstance(value, dict), "not an object"
        documented = spec[alternative]
        assert set(value) == set(documented), (
            f"{where}: keys differ from the doc: extra {sorted(set(value) - set(documented))}, "
            f"missing {sorted(set(documented) - set(value))}"
        )
        for key, expression in documented.items():
            check(value[key], expression, spec, f"{where}.{key}")
    else:
        assert alternative in PRIMITIVES, f"the doc names an unknown type {alternative!r}"
        assert isinstance(value, PRIMITIVES[alternative]), f"not {alternative}"
        # JSON booleans are not numbers, whatever Python's bool subclass says
        assert not (isinstance(value, bool) and alternative in ("integer", "number")), "a boolean"


@pytest.fixture
def spec() -> Spec:
    return documented_spec(DOC.read_text(encoding="utf-8"))


def test_the_doc_describes_every_object(spec: Spec) -> None:
    assert {"document", "run", "stage", "job", "progress", "endpoint", "recovery"} <= set(spec)
    versions = re.findall(r"^\| (\d+) \|", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert int(versions[-1]) == SCHEMA_VERSION, "add the new version to the doc's Versions table"


def test_status_json_matches_the_doc(
    spec: Spec, demo_run: DemoRun, runs_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = runs_root / "fresh"  # launched nothing yet: no state.db, no metrics
    fresh.mkdir()
    (fresh / "config.yaml").write_text(dump(RunConfig()))
    assert main(["status", "--json", "--runs-root", str(runs_root)]) == 0
    document = json.loads(capsys.readouterr().out)
    check(document, "document", spec, "$")
    assert document["schema"] == SCHEMA_VERSION
    demo, new = document["runs"]
    assert (demo["name"], new["name"]) == ("demo", "fresh")
    # the demo run exercises the nested objects, so their checks above were not vacuous
    assert demo["progress"] and demo["endpoint"] and demo["recoveries"] and len(demo["jobs"]) == 5
    assert new["status"] == "NEW" and new["progress"] is None and new["owner"] is None


def test_inproc_recoveries_match_the_doc(
    spec: Spec, demo_run: DemoRun, runs_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_inproc_events(demo_run.run, "re_formed")  # in progress: the nulls are documented too
    assert main(["status", "--json", str(demo_run.run.root)]) == 0
    [running] = json.loads(capsys.readouterr().out)["runs"]
    check(running, "run", spec, "$")
    add_inproc_events(demo_run.run, "first_step")
    assert main(["status", "--json", str(demo_run.run.root)]) == 0
    [finished] = json.loads(capsys.readouterr().out)["runs"]
    check(finished, "run", spec, "$")
    assert [r["finished"] for r in running["inproc_recoveries"] + finished["inproc_recoveries"]] == [False, True]


def test_the_checker_rejects_drift(spec: Spec) -> None:
    stage = {
        "name": "x",
        "kind": "train",
        "status": "RUNNING",
        "detail": "",
        "progress": None,
        "started_at": 1.0,
        "ended_at": None,
    }
    check(stage, "stage", spec, "$")
    with pytest.raises(AssertionError, match="extra"):
        check({**stage, "new_key": 1}, "stage", spec, "$")
    with pytest.raises(AssertionError, match="is not"):
        check({**stage, "progress": "half"}, "stage", spec, "$")
    with pytest.raises(AssertionError, match="is not"):
        check(True, "integer", spec, "$")


def test_the_doc_example_follows_the_doc(spec: Spec) -> None:
    example = re.search(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert example is not None
    check(json.loads(example.group(1)), "document", spec, "example")
