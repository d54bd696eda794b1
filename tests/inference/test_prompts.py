"""Prompt files: every bad line is named by file and line; the chat format; sampling checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.launchers.prompts import (
    InferenceError,
    Sampling,
    completion_record,
    format_prompt,
    read_prompts,
)


def write(tmp_path: Path, text: str | bytes, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_prompt_and_input_in_order_blank_lines_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path, '{"prompt": "一"}\n\n  \n{"input": "<用户>二<AI>", "output": "x"}\n{"prompt": "three", "id": 3}'
    )
    prompts = read_prompts(path)
    assert [(p.line, p.text) for p in prompts] == [(1, "一"), (4, "<用户>二<AI>"), (5, "three")]


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', ":2:"),
        ('{"prompt": "ok"}\n["a list"]\n', ":2: expected a JSON object"),
        ('{"prompt": "ok"}\n{"question": "no prompt key"}\n', ":2: no 'prompt' (or 'input') field"),
        ('{"prompt": 42}\n', ":1: 'prompt' must be a string"),
        ('{"prompt": "   "}\n', ":1: 'prompt' is empty"),
        (b'{"prompt": "\xff\xfe"}\n', ":1: not UTF-8"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, text: str | bytes, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InferenceError) as caught:
        read_prompts(path)
    assert f"{path}{expected}" in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_prompt_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InferenceError, match="no prompts"):
        read_prompts(path)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(InferenceError, match="prompt file does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def test_chat_format() -> None:
    assert format_prompt("你好", chat=True) == "<用户>你好<AI>"
    assert format_prompt("你好", chat=False) == "你好"
    assert format_prompt("<用户>已有<AI>", chat=True) == "<用户>已有<AI>"  # training-style input kept as is


@pytest.mark.parametrize(
    "field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("n", 0)]
)
def test_bad_sampling(field: str, value: float) -> None:
    with pytest.raises(InferenceError):
        Sampling(**{field: value})


def test_record_carries_sampling() -> None:
    record = completion_record(
        read_prompt(),
        "<用户>q<AI>",
        [{"text": "a", "finish_reason": "stop", "tokens": 2}],
        sampling=Sampling(temperature=0.0, seed=7),
        model="/m",
        engine="transformers",
    )
    assert record["text"] == "a" and record["sampling"]["seed"] == 7 and record["sampling"]["temperature"] == 0.0


def read_prompt():
    from fm9g.launchers.prompts import Prompt

    return Prompt(1, "q")
