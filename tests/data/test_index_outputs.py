"""What an index build leaves behind: modes others can read, warnings for suspect lines,
hints a CLI user can follow, and a clear error (and nothing half-written) on a full disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index

from .conftest import write_jsonl


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():  # type: ignore[no-untyped-def]
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_index_output_has_the_usual_modes_not_owner_only(tmp_path: Path, umask_022: None) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"output": f"line {i}"} for i in range(10)])
    out = build_index(source, tmp_path / "idx").output
    assert _mode(out) == 0o755
    for name in ("data.jsonl", "index", "index.h5", "meta.json"):
        assert _mode(out / name) == 0o644, name


def test_full_disk_while_indexing_names_the_filesystem_and_leaves_nothing(tmp_path: Path, small_tmpfs: Path) -> None:
    rows = [{"output": "x" * 1000 + str(i)} for i in range(3000)]  # about 3 MB: more than the 2 MiB filesystem
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_index(source, small_tmpfs / "idx")
    message = str(info.value)
    assert f"mounted at {small_tmpfs} is full" in message and "free of" in message
    assert f"free space on {small_tmpfs}, then run the same command again" in message
    assert list(small_tmpfs.iterdir()) == []  # no half-written index, no hidden temporary folder


def test_full_disk_from_the_cli_is_one_error_line_not_a_traceback(tmp_path: Path, small_tmpfs: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"output": "y" * 1000 + str(i)} for i in range(3000)])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fm9g.orchestrator.cli",
            "index",
            str(source),
            "-o",
            str(small_tmpfs / "idx"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "is full" in done.stderr and str(small_tmpfs) in done.stderr


def test_fail_mode_hint_names_the_cli_option(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"output": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        build_index(source, tmp_path / "idx")
    assert f"{source}:2" in str(info.value) and "--on-error skip" in str(info.value)


def test_raw_control_characters_are_kept_with_a_warning(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    lines = [b'{"output": "clean"}', b'{"output": "nul\x00inside"}', b'{"output": "ok"}', b'{"output": "bell\x07"}']
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = build_index(source, tmp_path / "idx")
    assert result.nlines == 4 and result.skipped_lines == 0 and result.errors == {}
    assert result.warnings == {str(source): {"raw_control_characters": 2}}
    assert result.warning_examples == [f"{source}:2: raw_control_characters"]
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text(encoding="utf-8"))
    assert meta["warnings"] == {str(source): {"raw_control_characters": 2}}


def test_cli_prints_the_control_character_warning(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"output": "a\x00b"}\n{"output": "fine"}\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fm9g.orchestrator.cli",
            "index",
            str(source),
            "-o",
            str(tmp_path / "idx"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stdout and "raw control characters" in done.stdout and f"{source}:1" in done.stdout


def test_a_clean_file_has_no_warnings(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"output": "tab\tand\rcr escaped by json.dumps"}])
    assert build_index(source, tmp_path / "idx").warnings == {}


def test_atomic_writes_get_the_umask_mode_unless_one_is_given(tmp_path: Path, umask_022: None) -> None:
    from fm9g.rundir.atomic import atomic_output, write_json, write_text

    assert _mode(write_json(tmp_path / "a.json", {"x": 1})) == 0o644  # mkstemp alone would give 0600
    with atomic_output(tmp_path / "b.bin") as handle:
        handle.write(b"x")
    assert _mode(tmp_path / "b.bin") == 0o644
    assert _mode(write_text(tmp_path / "api_key", "secret\n", mode=0o600)) == 0o600  # the serve key stays private
    os.umask(0o077)
    assert _mode(write_text(tmp_path / "c.txt", "x")) == 0o600  # a stricter umask is honoured
