"""Prompt files in, completion records out: the pure part of `infer` (no torch), which
the login side imports too (the stages check a prompt file, and the sampling each line
asks for, against the engine before they submit).

A prompt file is JSON lines, one object per line with a `prompt` string, or an `input`
string as in the training data, and optionally any of vLLM's sampling parameters for
that prompt alone (`"top_k": 20`, `"stop": ["\\n"]`, or a `"sampling": {...}` object; see
fm9g.launchers.sampling).  Blank lines are skipped; everything else that is not such an
object is an error naming the file and the line.  For models fine-tuned with
the chat format (config `data.sft`), each prompt becomes `<用户>{prompt}<AI>`, the
generation prompt of FM9G's chat format, unless it already holds the markers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fm9g.launchers.errors import InferenceError
from fm9g.launchers.sampling import (
    DEFAULTS,
    EngineName,
    Sampling,
    SamplingError,
    add_sampling_options,
    check_engine,
    merged,
    parse_overrides,
    sampling_from,
)

__all__ = [
    "DEFAULTS",
    "InferenceError",
    "Prompt",
    "Sampling",
    "add_sampling_options",
    "completion_record",
    "dump_jsonl",
    "format_prompt",
    "read_prompts",
    "sampling_from",
    "sampling_per_prompt",
]


USER, ASSISTANT = "<用户>", "<AI>"

# The FM9G chat format as a Jinja chat template, written into converted folders so that
# /v1/chat/completions works with transformers and vLLM alike.  The user turn ends
# with <AI>, which is itself the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    + USER
    + "{{ message['content'] }}"
    + ASSISTANT
    + "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- else -%}{{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt file: its 1-based line number, its text, and the sampling
    parameters the line sets for itself (vLLM names, parsed; see fm9g.launchers.sampling)."""

    line: int
    text: str
    sampling: Mapping[str, Any] = field(default_factory=dict)

    def sampling_of(self, base: Sampling) -> Sampling:
        """`base` with this line's own parameters."""
        return merged(base, self.sampling)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a jsonl file, in order; InferenceError names FILE:LINE of a bad one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InferenceError(f"{path}: prompt file does not exist") from None
    except IsADirectoryError:
        raise InferenceError(f"{path}: is a directory; --prompts takes a .jsonl file") from None
    prompts: list[Prompt] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InferenceError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise InferenceError(
                f'{where}:{exc.colno}: not valid JSON ({exc.msg}); each line must be an object like {{"prompt": "..."}}'
            ) from None
        if not isinstance(record, dict):
            raise InferenceError(
                f'{where}: expected a JSON object like {{"prompt": "..."}}, got {type(record).__name__}'
            )
        key = "prompt" if "prompt" in record else "input" if "input" in record else None
        if key is None:
            raise InferenceError(f"{where}: no 'prompt' (or 'input') field; keys are {sorted(record)}")
        text = record[key]
        if not isinstance(text, str):
            raise InferenceError(f"{where}: '{key}' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InferenceError(f"{where}: '{key}' is empty")
        try:
            overrides = parse_overrides(record)
        except SamplingError as exc:
            raise InferenceError(f"{where}: {exc}") from None
        prompts.append(Prompt(number, text, overrides))
    if not prompts:
        raise InferenceError(
            f'{path}: no prompts (the file is empty); write one JSON object per line, e.g. {{"prompt": "中国的首都是"}}'
        )
    return prompts


def sampling_per_prompt(path: str | Path, prompts: list[Prompt], base: Sampling, engine: EngineName) -> list[Sampling]:
    """Each prompt's sampling (`base` with the line's own values), checked against `engine`;
    InferenceError names FILE:LINE (or the command line) of the first that would fail."""
    try:
        check_engine(base, engine)
    except SamplingError as exc:
        raise InferenceError(f"sampling options: {exc}") from None
    out = []
    for prompt in prompts:
        try:
            sampling = prompt.sampling_of(base)
            check_engine(sampling, engine)
        except SamplingError as exc:
            raise InferenceError(f"{path}:{prompt.line}: {exc}") from None
        out.append(sampling)
    return out


def format_prompt(text: str, chat: bool) -> str:
    """The text fed to the model: the chat generation prompt for chat (sft) models."""
    if not chat or USER in text:
        return text  # plain model, or a training-style input that already has the markers
    return f"{USER}{text}{ASSISTANT}"


def completion_record(
    prompt: Prompt, model_input: str, outputs: list[dict[str, Any]], *, sampling: Sampling, model: str, engine: str
) -> dict[str, Any]:
    """One output line: the prompt, its completions (`text` is the first) and how they were made."""
    return {
        "line": prompt.line,
        "prompt": prompt.text,
        "input": model_input,
        "text": outputs[0]["text"] if outputs else "",
        "outputs": outputs,
        "sampling": sampling.to_dict(),
        "model": model,
        "engine": engine,
    }


def dump_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
