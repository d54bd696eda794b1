"""Bad input at load time: a transform that raises, over-long lines, broken legacy indexes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index
from fm9g.data.loader import PackedLoader
from fm9g.data.mixture import load_mixture
from fm9g.data.tokenizer import load_tokenizer

from .conftest import corpus_lines, write_jsonl

RAISING = """
def transform(data, num_sample, r):
    if "boom" in data["output"]:
        raise ValueError("cannot handle " + data["output"])
    return data
"""


def _entry(tmp: Path, rows: list[dict], **extra: Any) -> dict[str, Any]:
    build_index(write_jsonl(tmp / "raw.jsonl", rows), tmp / "idx")
    entry = {"dataset_name": "d", "task_name": "t1", "path": str(tmp / "idx")}
    entry.update(extra)
    return entry


def _loader(entry: dict, sp_model: Path, tmp: Path, **kw: Any) -> PackedLoader:
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_length", 32)
    return PackedLoader(load_mixture([entry], base_dir=tmp), load_tokenizer(sp_model), **kw)


def test_transform_that_raises(tmp_path: Path, sp_model: Path) -> None:
    (tmp_path / "t.py").write_text(RAISING)
    rows = [{"output": "fine"}, {"output": "boom here"}, {"output": "also fine"}]
    entry = _entry(tmp_path, rows, transforms="t.py", allow_repeat=False)
    with pytest.raises(DataError) as caught:
        list(_loader(entry, sp_model, tmp_path, batch_size=1))
    text = str(caught.value)
    assert "task t1" in text and f"{tmp_path / 'idx' / 'data.jsonl'}:2" in text
    assert "transform raised ValueError: cannot handle boom here" in text and "on_error='skip'" in text
    loader = _loader(entry, sp_model, tmp_path, batch_size=1, on_error="skip")
    batches = list(loader)
    assert sum(b["num_tokens"] > 0 for b in batches) >= 1
    assert loader.skipped == {"t1": {"error": 1}}


def test_line_far_longer_than_max_length(tmp_path: Path, sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    huge = " ".join(corpus_lines(200))  # thousands of tokens
    rows = [{"output": huge}, {"input": "q " * 5, "output": huge}, {"output": "short"}]
    entry = _entry(tmp_path, rows, allow_repeat=False)
    n_tokens = len(tok.encode(huge)) + 1
    # segment: the pure LM line becomes consecutive windows; the instruction line is cut to its head
    lengths = []
    for batch in _loader(entry, sp_model, tmp_path):
        cu = batch["cu_seqlens"].tolist()
        flat_tasks = batch["task_ids"].reshape(-1).tolist()
        lengths += [b - a for a, b in zip(cu, cu[1:]) if flat_tasks[a] >= 0]
    windows = [n_tokens // 32 * [32]] + ([[n_tokens % 32]] if n_tokens % 32 >= 9 else [])
    expected = sorted(sum(windows, []) + [32, len(tok.encode("short")) + 1])
    assert sorted(lengths) == expected
    # drop: both long lines are skipped and counted
    loader = _loader(entry, sp_model, tmp_path, oversize_rule="drop")
    batches = list(loader)
    assert loader.skipped == {"t1": {"oversize_dropped": 2}}
    assert sum(b["num_tokens"] for b in batches) == len(tok.encode("short")) + 1


def test_invalid_json_in_a_legacy_index(tmp_path: Path, sp_model: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    lines = [b'{"output": "good"}\n', b'{"output": broken\n', b'{"output": "good too"}\n']
    (legacy / "data.jsonl").write_bytes(b"".join(lines))
    ends, total = [], 0
    for line in lines:
        total += len(line)
        ends.append(total)
    (legacy / "index").write_text("\n".join(map(str, ends)) + "\n")
    entry = {"dataset_name": "d", "task_name": "legacy", "path": str(legacy), "allow_repeat": False}
    with pytest.raises(DataError, match=rf"task legacy, {legacy / 'data.jsonl'}:2: not valid JSON"):
        list(_loader(entry, sp_model, tmp_path, batch_size=1))
    loader = _loader(entry, sp_model, tmp_path, batch_size=1, on_error="skip")
    batches = list(loader)
    assert sum(int(b["segment_ids"][0].max()) for b in batches) == 2  # two samples (+ padding segment)
    assert loader.skipped == {"legacy": {"error": 1}}


def test_transform_returning_garbage(tmp_path: Path, sp_model: Path) -> None:
    (tmp_path / "t.py").write_text("def transform(data, num_sample, r):\n    return ['not', 'a', 'dict']\n")
    entry = _entry(tmp_path, [{"output": "x"}], transforms="t.py")
    with pytest.raises(DataError, match="transform returned list"):
        next(_loader(entry, sp_model, tmp_path))


def test_transform_gets_seeded_rng_and_num_sample(tmp_path: Path, sp_model: Path) -> None:
    (tmp_path / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    return {'input': '', 'output': data['output'] + ' ' + str(num_sample) + ' ' + str(r.randint(0, 10**9))}\n"
    )
    entry = _entry(tmp_path, [{"output": f"line{i}"} for i in range(6)], transforms="t.py", incontext_weight=[0, 1])
    tok = load_tokenizer(sp_model)
    first = next(_loader(entry, sp_model, tmp_path, batch_size=1, max_length=64))
    second = next(_loader(entry, sp_model, tmp_path, batch_size=1, max_length=64, num_workers=1))
    assert first["input_ids"].equal(second["input_ids"])
    text = tok.decode([t for t in first["input_ids"][0].tolist() if t > 2])
    assert " 1 " in text  # num_sample drawn from incontext_weight [0, 1]


def test_dead_worker_is_a_clear_error(tmp_path: Path, sp_model: Path) -> None:
    entry = _entry(tmp_path, [{"output": t} for t in corpus_lines(400)])
    loader = _loader(entry, sp_model, tmp_path, num_workers=1)
    next(loader)
    assert loader._prefetch is not None
    loader._prefetch._workers[0].process.kill()
    with pytest.raises(DataError, match="loader worker fm9g-loader-0 .* exited with code"):
        for _ in range(500):
            next(loader)
    loader.close()
