"""Bad input to the indexer: each kind fails with file:line in fail mode, is counted in skip mode.

Every test also checks that no partial index or work directory is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fm9g.data.indexer as indexer
from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index

GOOD = b'{"input":"","output":"\xe5\xa5\xbd"}\n'


def _file(tmp_path: Path, *lines: bytes, name: str = "a.jsonl") -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def _no_leftovers(tmp_path: Path, *expected: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", *expected])


def _fail_and_skip(tmp_path: Path, src: Path, line: int, kind: str, message: str) -> None:
    with pytest.raises(DataError) as caught:
        build_index(src, tmp_path / "idx")
    text = str(caught.value)
    assert f"{src}:{line}: " in text and message in text and "on_error='skip'" in text
    _no_leftovers(tmp_path)
    result = build_index(src, tmp_path / "idx", on_error="skip")
    assert result.errors == {str(src): {kind: 1}}
    assert result.skipped_lines == 1 and result.examples[0].startswith(f"{src}:{line}: {kind}")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text(encoding="utf-8"))
    assert meta["errors"] == {str(src): {kind: 1}} and meta["skipped_lines"] == 1
    data = (tmp_path / "idx" / "data.jsonl").read_bytes()
    assert data == GOOD * meta["nlines"]
    _no_leftovers(tmp_path, "idx")


def test_invalid_json_line(tmp_path: Path) -> None:
    src = _file(tmp_path, GOOD, GOOD, b'{"input": "", "output": "cut off\n', GOOD)
    _fail_and_skip(tmp_path, src, 3, "invalid_json", "invalid JSON")


def test_missing_output_field(tmp_path: Path) -> None:
    src = _file(tmp_path, GOOD, b'{"input": "q", "answer": "a"}\n', GOOD)
    _fail_and_skip(tmp_path, src, 2, "missing_output", 'no "output" field')


def test_output_not_a_string(tmp_path: Path) -> None:
    src = _file(tmp_path, GOOD, GOOD, GOOD, b'{"output": 42}\n')
    _fail_and_skip(tmp_path, src, 4, "bad_field_type", '"output" is int')


def test_line_not_an_object(tmp_path: Path) -> None:
    src = _file(tmp_path, b'["input", "output"]\n', GOOD)
    _fail_and_skip(tmp_path, src, 1, "not_object", "array, not an object")


def test_non_utf8_bytes(tmp_path: Path) -> None:
    # the bad byte sits in a field the sampler never reads: still rejected
    src = _file(tmp_path, GOOD, b'{"output": "ok", "source": "\xff\xfe"}\n', GOOD)
    _fail_and_skip(tmp_path, src, 2, "invalid_utf8", "not valid UTF-8")


def test_blank_line(tmp_path: Path) -> None:
    src = _file(tmp_path, GOOD, b"   \r\n", GOOD)
    _fail_and_skip(tmp_path, src, 2, "blank_line", "blank line")


def test_empty_file(tmp_path: Path) -> None:
    empty = _file(tmp_path, name="empty.jsonl")
    _file(tmp_path, GOOD, name="full.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file; remove the empty file"):
        build_index(tmp_path / "in", tmp_path / "idx")
    _no_leftovers(tmp_path)
    result = build_index(tmp_path / "in", tmp_path / "idx", on_error="skip")
    assert result.errors == {str(empty): {"empty_file": 1}} and result.nlines == 1
    _no_leftovers(tmp_path, "idx")


def test_only_bad_lines_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    src = _file(tmp_path, b"nope\n", b"{}\n")
    with pytest.raises(DataError, match=r"no valid lines in the inputs \(2 bad lines skipped\)"):
        build_index(src, tmp_path / "idx", on_error="skip")
    _no_leftovers(tmp_path)


def test_bad_txt_line(tmp_path: Path) -> None:
    src = _file(tmp_path, "好\n".encode(), b"\xc3\x28 broken\n", name="a.txt")
    with pytest.raises(DataError, match=rf"{src}:2: not valid UTF-8"):
        build_index(src, tmp_path / "idx")
    _no_leftovers(tmp_path)


def test_first_bad_line_in_input_order_across_parallel_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 400 lines cut into 4 shards; bad lines at 150 (shard 2) and 390 (shard 4)
    lines = [GOOD] * 400
    lines[149] = b"{broken\n"
    lines[389] = b"[]\n"
    src = _file(tmp_path, *lines)
    monkeypatch.setattr(indexer, "choose_shard_count", lambda total, processes: 4)
    for processes in (1, 2):
        with pytest.raises(DataError, match=rf"{src}:150: invalid JSON"):
            build_index(src, tmp_path / "idx", processes=processes)
        _no_leftovers(tmp_path)
    result = build_index(src, tmp_path / "idx", processes=2, on_error="skip")
    assert result.errors == {str(src): {"invalid_json": 1, "not_object": 1}}
    assert [e.split(": ")[0] for e in result.examples] == [f"{src}:150", f"{src}:390"]
    assert result.nlines == 398


def test_cached_failure_is_not_reused(tmp_path: Path) -> None:
    src = _file(tmp_path, GOOD, b"bad\n")
    with pytest.raises(DataError):
        build_index(src, tmp_path / "idx", cache_dir=tmp_path / "cache")
    src.write_bytes(GOOD * 2)
    assert build_index(src, tmp_path / "idx", cache_dir=tmp_path / "cache").nlines == 2


def test_slurm_tasks_report_the_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fm9g.data import index_merge, index_shard
    from fm9g.data.index_plan import plan_shards, read_plan

    lines = [GOOD] * 100
    lines[70] = b'{"input": ""}\n'
    src = _file(tmp_path, *lines)
    plan_path = plan_shards(src, 3, tmp_path / "work", output=tmp_path / "idx")
    codes = [
        index_shard.main(["--plan", str(plan_path), "--task-id", str(k)])
        for k in range(len(read_plan(plan_path)["shards"]))
    ]
    assert codes.count(1) == 1 and "missing_output" not in capsys.readouterr().err  # message, not the kind name
    assert index_merge.main(["--plan", str(plan_path)]) == 1
    assert f'{src}:71: no "output" field' in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
