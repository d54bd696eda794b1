"""jsonl/txt → index directory: layout, statistics, parallelism, caching, the Slurm path."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import fm9g.data.indexer as indexer
from fm9g.data import index_merge, index_shard
from fm9g.data.errors import DataError
from fm9g.data.index_plan import plan_shards, read_plan
from fm9g.data.indexer import build_index

from .conftest import corpus_lines, write_jsonl


def _rows(count: int, seed: int = 0) -> list[dict]:
    lines = corpus_lines(count, seed)
    rows: list[dict] = []
    for i, text in enumerate(lines):
        row: dict = {"input": "", "output": text}
        if i % 5 == 0:
            row = {"input": "问：" + text[:10], "output": text, "source": "test", "tags": ["a", "b"]}
        if i % 7 == 0:
            row = {"output": text}  # input is optional
        rows.append(row)
    return rows


def _read_index(out: Path) -> tuple[bytes, list[int], np.ndarray, dict]:
    data = (out / "data.jsonl").read_bytes()
    text = [int(x) for x in (out / "index").read_text().split("\n") if x]
    with h5py.File(out / "index.h5", "r") as h5:
        h5_bounds = h5["index"][:]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    return data, text, h5_bounds, meta


def _estimate(line: bytes, language: str) -> float:
    """The original script's rule, written plainly."""
    if language == "zh":
        return 0.7 * len(line.decode("utf-8"))
    return 1.5 * len(line.decode("utf-8").split(" "))


def test_round_trip_layout_and_meta(tmp_path: Path) -> None:
    rows = _rows(300)
    rows.append({"input": "", "output": "raw \r inside and \\r escaped"})
    src = write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    # a raw carriage return inside a JSON string (json.loads(strict=False) accepts it)
    with open(src, "ab") as handle:
        handle.write(b'{"input":"","output":"bare\rcr"}\r\n')
    result = build_index(src, tmp_path / "idx")
    data, text, h5_bounds, meta = _read_index(tmp_path / "idx")
    assert data == src.read_bytes()
    lines = src.read_bytes().split(b"\n")[:-1]
    assert result.nlines == meta["nlines"] == len(lines) == len(rows) + 1
    assert text[0] == 0 and text[-1] == len(data) == meta["nbytes"]
    assert h5_bounds.dtype == np.int64 and list(h5_bounds) == text and len(text) == len(lines) + 1
    for k, line in enumerate(lines):
        assert data[text[k] : text[k + 1]] == line + b"\n"
    assert set(meta) >= {
        "language",
        "nlines",
        "nbytes",
        "length_distribute",
        "avg_token_per_line",
        "hdfs_path",
        "data_sample",
        "token_count_method",
        "errors",
    }
    assert meta["language"] == "zh" and meta["hdfs_path"] is None
    assert meta["token_count_method"] == "estimate-zh-0.7char"
    expected = [_estimate(line + b"\n", "zh") for line in lines]
    assert meta["avg_token_per_line"] == pytest.approx(sum(expected) / len(expected))
    assert list(meta["length_distribute"]) == [
        "less_4k",
        "4k-8k",
        "8k-16k",
        "16k-32k",
        "32k-64k",
        "64k-128k",
        "128k-256k",
        "more_256k",
    ]
    assert meta["errors"] == {} and result.skipped_lines == 0
    first = rows[0]["output"]
    assert meta["data_sample"] == {"output": first[:50] + "..." if len(first) > 50 else first}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "in"]  # no work dirs left


def test_length_buckets_follow_decimal_thousands(tmp_path: Path) -> None:
    # zh: 0.7 × characters of the raw line; 5715 chars → 4000.5 tokens (4k-8k)
    body = '{"input":"","output":"' + "字" * 5715 + '"}'
    short = '{"input":"","output":"短"}'
    huge = '{"input":"","output":"' + "x" * 400000 + '"}'
    src = tmp_path / "a.jsonl"
    src.write_text("\n".join([short, body, huge]) + "\n", encoding="utf-8")
    meta = build_index(src, tmp_path / "zh").meta
    dist = meta["length_distribute"]
    assert dist["less_4k"] == 1 and dist["4k-8k"] == 1 and dist["more_256k"] == 1
    # en: 1.5 × pieces split on single spaces
    words = '{"input":"","output":"' + " ".join(["w"] * 2700) + '"}'
    src.write_text(words + "\n" + short + "\n", encoding="utf-8")
    meta = build_index(src, tmp_path / "en", language="en").meta
    assert meta["token_count_method"] == "estimate-en-1.5words"
    assert meta["length_distribute"]["4k-8k"] == 1 and meta["length_distribute"]["less_4k"] == 1
    assert meta["avg_token_per_line"] == pytest.approx((1.5 * 2700 + 1.5 * 1) / 2)


def test_missing_final_newline_is_added(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"output": "一"}, {"output": "二"}], trailing_newline=False)
    build_index(src, tmp_path / "idx")
    data, text, _, meta = _read_index(tmp_path / "idx")
    assert data == src.read_bytes() + b"\n"
    assert meta["nlines"] == 2 and text[-1] == len(data)


def test_directory_with_jsonl_and_txt(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"output": "b1"}, {"output": "b2"}])
    (tmp_path / "in" / "a.txt").write_text("第一行\n\n  second line \r\n", encoding="utf-8")
    (tmp_path / "in" / "sub").mkdir()
    write_jsonl(tmp_path / "in" / "sub" / "c.jsonl", [{"output": "c1"}])
    (tmp_path / "in" / "notes.md").write_text("ignored")
    result = build_index(tmp_path / "in", tmp_path / "idx", language="en")
    data, _, _, meta = _read_index(tmp_path / "idx")
    outputs = [json.loads(line)["output"] for line in data.decode("utf-8").split("\n")[:-1]]
    assert outputs == ["第一行", "second line", "b1", "b2", "c1"]  # sorted paths, txt converted
    assert data.split(b"\n")[0] == '{"input":"","output":"第一行"}'.encode()
    assert result.nlines == 5 and len(meta["sources"]) == 3


def test_parallel_equals_serial_and_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [write_jsonl(tmp_path / "in" / f"{i}.jsonl", _rows(200, seed=i)) for i in range(2)]
    (tmp_path / "in" / "2.txt").write_text("\n".join(corpus_lines(120)), encoding="utf-8")
    # many small shards, so several files are cut at line boundaries
    monkeypatch.setattr(indexer, "choose_shard_count", lambda total, processes: 7)
    serial = build_index(tmp_path / "in", tmp_path / "one", processes=1)
    calls: list[tuple[int, int]] = []
    parallel = build_index(tmp_path / "in", tmp_path / "two", processes=2, progress=lambda d, t: calls.append((d, t)))
    assert serial.shards_total == parallel.shards_total == 7
    for name in ("data.jsonl", "index"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert serial.meta == parallel.meta
    total = sum(f.stat().st_size for f in files) + (tmp_path / "in" / "2.txt").stat().st_size
    assert calls[-1] == (total, total)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_cache_skips_finished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"{i}.jsonl", _rows(50, seed=i))
    monkeypatch.setattr(indexer, "choose_shard_count", lambda total, processes: 3)
    first = build_index(tmp_path / "in", tmp_path / "idx", cache_dir=tmp_path / "cache")
    assert (first.shards_total, first.shards_cached) == (3, 0)
    before = (tmp_path / "idx" / "data.jsonl").read_bytes()
    second = build_index(tmp_path / "in", tmp_path / "idx", cache_dir=tmp_path / "cache")
    assert (second.shards_total, second.shards_cached) == (3, 3)
    assert (tmp_path / "idx" / "data.jsonl").read_bytes() == before
    # rewriting one file invalidates only the shards that read it
    write_jsonl(tmp_path / "in" / "2.jsonl", _rows(50, seed=9))
    third = build_index(tmp_path / "in", tmp_path / "idx", cache_dir=tmp_path / "cache")
    assert third.shards_cached == 2
    assert (tmp_path / "idx" / "data.jsonl").read_bytes() != before


def test_tokenizer_counts(tmp_path: Path, sp_model: Path) -> None:
    from fm9g.data.tokenizer import load_tokenizer

    rows = _rows(60)
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    meta = build_index(src, tmp_path / "idx", tokenizer=sp_model).meta
    tok = load_tokenizer(sp_model)
    counts = [len(tok.encode(r.get("input") or "")) + len(tok.encode(r["output"])) for r in rows]
    assert meta["token_count_method"] == "tokenizer"
    assert meta["avg_token_per_line"] == pytest.approx(sum(counts) / len(counts))
    # a loaded tokenizer object works too
    assert build_index(src, tmp_path / "idx2", tokenizer=tok).meta == meta


def test_data_sample_is_shrunk(tmp_path: Path) -> None:
    inner = json.dumps({"k": "v" * 80, "list": [1, 2, 3]})
    row = {"input": "<用户>" + "q" * 100, "output": "短", "meta": inner, "items": ["x" * 60, "y"]}
    src = write_jsonl(tmp_path / "a.jsonl", [row])
    sample = build_index(src, tmp_path / "idx").meta["data_sample"]
    assert sample["input"] == ("<用户>" + "q" * 100)[:50] + "..."
    assert sample["output"] == "短"
    assert sample["items"] == ["x" * 50 + "..."]
    assert json.loads(sample["meta"]) == {"k": "v" * 50 + "...", "list": [1]}


def test_output_rules(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in" / "a.jsonl", [{"output": "x"}])
    with pytest.raises(DataError, match="must differ"):
        build_index(tmp_path / "in", tmp_path / "in")
    with pytest.raises(DataError, match="must differ"):
        build_index(tmp_path / "in", tmp_path / "in" / "idx")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an index directory"):
        build_index(src, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    # an existing index is replaced
    build_index(src, tmp_path / "idx")
    write_jsonl(src, [{"output": "y"}, {"output": "z"}])
    assert build_index(src, tmp_path / "idx").nlines == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "in", "mine"]
    with pytest.raises(DataError, match="language"):
        build_index(src, tmp_path / "idx", language="fr")  # type: ignore[arg-type]


def test_slurm_plan_shard_merge_matches_build_index(tmp_path: Path) -> None:
    for i in range(2):
        write_jsonl(tmp_path / "in" / f"{i}.jsonl", _rows(120, seed=i))
    plan_path = plan_shards(tmp_path / "in", 5, tmp_path / "work", output=tmp_path / "slurm", language="en")
    plan = read_plan(plan_path)
    assert len(plan["shards"]) == 5
    for task in range(len(plan["shards"])):
        assert index_shard.main(["--plan", str(plan_path), "--task-id", str(task)]) == 0
    # a re-run of a finished task is a no-op (cached)
    assert index_shard.main(["--plan", str(plan_path), "--task-id", "0"]) == 0
    assert index_merge.main(["--plan", str(plan_path)]) == 0
    build_index(tmp_path / "in", tmp_path / "local", language="en")
    for name in ("data.jsonl", "index"):
        assert (tmp_path / "slurm" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    slurm_meta = json.loads((tmp_path / "slurm" / "meta.json").read_text())
    local_meta = json.loads((tmp_path / "local" / "meta.json").read_text())
    assert slurm_meta == local_meta


def test_merge_without_shard_results_is_clear(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"output": "x"}])
    plan_path = plan_shards(tmp_path / "a.jsonl", 1, tmp_path / "work")
    assert index_merge.main(["--plan", str(plan_path)]) == 1
    with pytest.raises(DataError, match="has no result"):
        index_merge.merge_shards([tmp_path / "work" / "shards" / "nope"], tmp_path / "out")


def test_module_entry_points_run_as_scripts(tmp_path: Path) -> None:
    import subprocess
    import sys

    write_jsonl(tmp_path / "in" / "a.jsonl", _rows(30))
    (tmp_path / "in" / "b.txt").write_text("一行\n两行\n", encoding="utf-8")
    plan_path = plan_shards(tmp_path / "in", 2, tmp_path / "work", output=tmp_path / "out")
    for task in range(len(read_plan(plan_path)["shards"])):
        done = subprocess.run(
            [sys.executable, "-m", "fm9g.data.index_shard", "--plan", str(plan_path), "--task-id", str(task)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "fm9g.data.index_merge", "--plan", str(plan_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["nlines"] == 32
    done = subprocess.run(
        [sys.executable, "-m", "fm9g.data.txt2jsonl", str(tmp_path / "in" / "b.txt"), str(tmp_path / "b.jsonl")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and (tmp_path / "b.jsonl").read_text(encoding="utf-8").count("\n") == 2
