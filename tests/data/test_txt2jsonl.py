"""txt → jsonl conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fm9g.data.errors import DataError
from fm9g.data.txt2jsonl import txt2jsonl


def test_blank_lines_skipped_and_lines_stripped(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes("  中国的首都是北京。 \n\n   \nhello\tworld\r\nlast line no newline".encode())
    dst = tmp_path / "a.jsonl"
    assert txt2jsonl(src, dst) == 3
    raw = dst.read_bytes().decode("utf-8")
    lines = raw.split("\n")
    assert lines[-1] == ""
    assert lines[0] == '{"input":"","output":"中国的首都是北京。"}'  # no ASCII escaping
    assert [json.loads(line) for line in lines[:-1]] == [
        {"input": "", "output": "中国的首都是北京。"},
        {"input": "", "output": "hello\tworld"},
        {"input": "", "output": "last line no newline"},
    ]


def test_unicode_line_separators_do_not_split(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes("a\u2028b\x0cc\rd 😀\n".encode())
    dst = tmp_path / "a.jsonl"
    assert txt2jsonl(src, dst) == 1
    assert json.loads(dst.read_text(encoding="utf-8"))["output"] == "a\u2028b\x0cc\rd 😀"


def test_non_utf8_names_line_and_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(b"ok\n\xff\xfe bad\n")
    dst = tmp_path / "a.jsonl"
    with pytest.raises(DataError, match=r"a\.txt:2: not valid UTF-8"):
        txt2jsonl(src, dst)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == [src]
