"""Mixture config validation: every mistake names file, entry, field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index
from fm9g.data.mixture import load_mixture, needs_index

from .conftest import write_jsonl

SCRIPT = """
import random

def transform(data, num_sample: int, r: random.Random):
    return {"input": data.get("input", ""), "output": data.get("output", "")}
"""


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A mixture directory: one indexed dataset, one raw jsonl, a transform script."""
    root = tmp_path / "mix"
    raw = write_jsonl(root / "raw" / "b.jsonl", [{"output": "x"}])
    build_index(raw, root / "indexed")
    (root / "scripts").mkdir()
    (root / "scripts" / "script_cpmc.py").write_text(SCRIPT)
    return root


def _entry(**overrides: Any) -> dict[str, Any]:
    entry = {
        "dataset_name": "a",
        "task_name": "a",
        "abs_weight": 0.2,
        "path": "indexed",
        "transforms": "scripts/script_cpmc.py",
        "allow_repeat": True,
        "nlines": 1,
        "ave_tokens_per_line": 100,
        "total_tokens": 0.1,
    }
    entry.update(overrides)
    return entry


def _write(root: Path, entries: Any) -> Path:
    path = root / "mixture.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_guide_example_loads_and_resolves_paths(setup: Path) -> None:
    path = _write(setup, [_entry(), _entry(task_name="b", dataset_name="b", path="raw/b.jsonl", abs_weight=0.006)])
    mixture = load_mixture(path)
    assert mixture.task_names == ["a", "b"] and len(mixture) == 2 and mixture.uses_abs_weight
    first, second = mixture.entries
    assert (
        Path(first.path) == setup / "indexed" and Path(first.transforms or "") == setup / "scripts" / "script_cpmc.py"
    )
    assert not needs_index(first) and needs_index(second)
    assert first.oversize_rule is None and first.incontext_weight == [1.0]


def test_list_input_with_base_dir(setup: Path) -> None:
    mixture = load_mixture([_entry(transforms=None)], base_dir=setup)
    assert Path(mixture.entries[0].path) == setup / "indexed" and mixture.entries[0].transforms is None


def _error(setup: Path, entries: Any) -> str:
    path = _write(setup, entries)
    with pytest.raises(DataError) as caught:
        load_mixture(path)
    text = str(caught.value)
    assert text.startswith(str(path))
    return text


def test_unknown_field_suggests(setup: Path) -> None:
    text = _error(setup, [_entry(), _entry(task_name="b", abs_wieght=1)])
    assert "entry 1 (b)" in text and "field 'abs_wieght'" in text and "did you mean 'abs_weight'" in text


def test_duplicate_task_name(setup: Path) -> None:
    text = _error(setup, [_entry(), _entry()])
    assert "entry 1 (a)" in text and "field 'task_name'" in text and "duplicate of entry 0" in text


def test_negative_weight(setup: Path) -> None:
    text = _error(setup, [_entry(abs_weight=-1)])
    assert "entry 0 (a)" in text and "field 'abs_weight'" in text and "greater than or equal to 0" in text


def test_all_weights_zero(setup: Path) -> None:
    text = _error(setup, [_entry(abs_weight=0), _entry(task_name="b", abs_weight=0.0)])
    assert "all weights are zero" in text


def test_abs_weight_on_some_entries_only(setup: Path) -> None:
    entry = _entry(task_name="b")
    del entry["abs_weight"]
    text = _error(setup, [_entry(), entry])
    assert "entry 1 (b)" in text and "field 'abs_weight'" in text


def test_missing_required_field(setup: Path) -> None:
    entry = _entry()
    del entry["path"]
    assert "field 'path': required field is missing" in _error(setup, [entry])


def test_path_does_not_exist(setup: Path) -> None:
    text = _error(setup, [_entry(path="nope")])
    assert "field 'path'" in text and "does not exist" in text


def test_path_is_not_data(setup: Path) -> None:
    (setup / "empty").mkdir()
    assert "neither an index directory" in _error(setup, [_entry(path="empty")])


def test_transform_script_missing(setup: Path) -> None:
    text = _error(setup, [_entry(transforms="scripts/nope.py")])
    assert "field 'transforms'" in text and "nope.py does not exist" in text


def test_transform_without_function(setup: Path) -> None:
    (setup / "scripts" / "empty.py").write_text("x = 1\n")
    assert "does not define transform(data, num_sample, r)" in _error(setup, [_entry(transforms="scripts/empty.py")])


def test_transform_with_wrong_signature(setup: Path) -> None:
    (setup / "scripts" / "two.py").write_text("def transform(data, r):\n    return data\n")
    assert "must accept (data, num_sample, r)" in _error(setup, [_entry(transforms="scripts/two.py")])


def test_transform_that_fails_to_import(setup: Path) -> None:
    (setup / "scripts" / "boom.py").write_text("import no_such_module_xyz\n")
    assert "raised ModuleNotFoundError on import" in _error(setup, [_entry(transforms="scripts/boom.py")])


def test_top_level_must_be_a_list(setup: Path) -> None:
    assert "a mixture is a JSON list" in _error(setup, _entry())


def test_bad_incontext_weight(setup: Path) -> None:
    assert "field 'incontext_weight'" in _error(setup, [_entry(incontext_weight=[0, 0])])


def test_invalid_json_file(setup: Path) -> None:
    path = setup / "mixture.json"
    path.write_text("[\n{,}\n]")
    with pytest.raises(DataError, match=r"mixture\.json:2: not valid JSON"):
        load_mixture(path)


def test_duplicate_key_in_a_mixture_entry_names_file_line_and_key(setup: Path) -> None:
    path = setup / "mixture.json"
    path.write_text(
        '[\n  {"dataset_name": "a", "task_name": "a", "path": "indexed",\n'
        '   "abs_weight": 0.5,\n   "path": "raw/b.jsonl"}\n]\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_mixture(path)
    assert f"{path}:4:" in str(info.value) and "'path'" in str(info.value) and "twice" in str(info.value)


FAILS_ALWAYS = """
def transform(data, num_sample, r):
    return data["no_such_key"]
"""

FAILS_ON_ONE = """
def transform(data, num_sample, r):
    if data["output"] == "bad":
        raise ValueError("this record")
    return data
"""


def test_check_transforms_refuses_a_transform_that_fails_on_every_record(setup: Path) -> None:
    from fm9g.data.mixture import check_transforms

    (setup / "scripts" / "broken.py").write_text(FAILS_ALWAYS)
    mixture = load_mixture(_write(setup, [_entry(transforms="scripts/broken.py")]))
    with pytest.raises(DataError) as info:
        check_transforms(mixture)
    message = str(info.value)
    assert "entry 0 (a)" in message and "field 'transforms'" in message and "broken.py" in message
    assert f"{setup / 'indexed' / 'data.jsonl'}:1: raised KeyError" in message  # the dataset file and record


def test_check_transforms_reads_raw_data_too_and_accepts_working_scripts(setup: Path) -> None:
    from fm9g.data.mixture import check_transforms

    (setup / "scripts" / "broken.py").write_text(FAILS_ALWAYS)
    good = load_mixture(_write(setup, [_entry(), _entry(task_name="b", path="raw/b.jsonl")]))
    check_transforms(good)  # the guide's script works on both
    raw = load_mixture(_write(setup, [_entry(task_name="b", path="raw/b.jsonl", transforms="scripts/broken.py")]))
    with pytest.raises(DataError, match=r"raw/b.jsonl:1: raised KeyError"):
        check_transforms(raw)


def test_check_transforms_leaves_one_bad_record_to_the_run(setup: Path) -> None:
    from fm9g.data.mixture import check_transforms

    write_jsonl(setup / "raw2" / "c.jsonl", [{"output": "bad"}, {"output": "good"}])
    (setup / "scripts" / "picky.py").write_text(FAILS_ON_ONE)
    check_transforms(load_mixture(_write(setup, [_entry(path="raw2/c.jsonl", transforms="scripts/picky.py")])))
