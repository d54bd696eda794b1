"""Shared fixtures for the data tests: tiny tokenizers built here, sample corpora."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm9g.data.tokenizer import train_sentencepiece
from tests.helpers.tmpfs import mounted_tmpfs

ZH = "中国的首都是北京。今天天气很好，我们去公园散步吧！人工智能正在改变世界，数据处理流程"
EN = "the quick brown fox jumps over the lazy dog while data pipelines index every line"
CODE = "def f(x):\n    return x * 2  # double\n\nprint(f(3))\r\n\tif a: pass"
EMOJI = "emoji 😀🚀 ok ✓"


def corpus_lines(count: int, seed: int = 0) -> list[str]:
    """Real-looking mixed text: Chinese, English, code (with \\r and tabs), emoji."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            out.append("".join(rng.choice(ZH) for _ in range(rng.randint(5, 60))))
        elif kind == 1:
            out.append(" ".join(rng.choice(EN.split()) for _ in range(rng.randint(3, 30))))
        elif kind == 2:
            out.append(CODE[: rng.randint(10, len(CODE))])
        else:
            out.append(EMOJI + " " + rng.choice(ZH) * rng.randint(1, 5))
    return out


def write_jsonl(path: Path, rows: list[dict], *, trailing_newline: bool = True) -> Path:
    """Write rows as jsonl (UTF-8, no ASCII escaping)."""
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    if trailing_newline:
        text += "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE sentencepiece model trained on the mixed corpus (once per session)."""
    out = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    return train_sentencepiece(corpus_lines(400), out, 600)


@pytest.fixture(scope="session")
def cpm_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cpm vocab.txt: specials, chat markers, 256 byte tokens, some words and chars."""
    tokens = ["<unk>", "<s>", "</s>", "<用户>", "<AI>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["中国", "北京", "首都", "天气", "人工智能", "the", " ", "quick", "qu", "brown", "fox", "def", "return"]
    tokens += sorted(set(ZH + EN) - {" "})
    path = tmp_path_factory.mktemp("cpm") / "vocab.txt"
    # Blank lines are allowed in the file and do not take an id.
    lines = [json.dumps(t, ensure_ascii=False) for t in tokens]
    lines.insert(10, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs to fill up (ENOSPC for real); skipped where mounting is not permitted."""
    with mounted_tmpfs(tmp_path / "small_fs", "2m") as mount:
        yield mount
