"""The rich progress bar wrapper used by the CLI around build_index."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from fm9g.data.indexer import build_index
from fm9g.data.progress import byte_progress

from .conftest import write_jsonl


def test_bar_reports_bytes(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"output": "行"}] * 50)
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=100)
    with byte_progress("indexing a.jsonl", console=console) as update:
        build_index(src, tmp_path / "idx", progress=update)
    text = sink.getvalue()
    assert "indexing a.jsonl" in text
    size = src.stat().st_size
    assert f"{size}" in text.replace(",", "") or f"{size / 1000:.1f}" in text
