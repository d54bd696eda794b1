"""Prompt files in, completion records out, and the sampling options: the pure part of
`infer` (no torch), which the login side imports too (the CLI builds its parser from
`add_sampling_options`; the stages check a prompt file before they submit).

A prompt file is JSON lines, one object per line with a `prompt` string, or an `input`
string as in the training data.  Blank lines are skipped; everything else that is not
such an object is an error naming the file and the line.  For models fine-tuned with
the chat format (config `data.sft`), each prompt becomes `<用户>{prompt}<AI>`, the
generation prompt of FM9G's chat format, unless it already holds the markers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class InferenceError(RuntimeError):
    """A convert, infer or serve stage cannot go on; the message names the file (and
    line) or the job at fault and says what to do next."""


DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "n": 1, "seed": 0}

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
    """One prompt of a prompt file: its 1-based line number and its text."""

    line: int
    text: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of an infer run (the names of vLLM's SamplingParams)."""

    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    max_tokens: int = DEFAULTS["max_tokens"]
    n: int = DEFAULTS["n"]
    seed: int = DEFAULTS["seed"]

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise InferenceError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_tokens < 1:
            raise InferenceError(f"--max-tokens {self.max_tokens}: must be at least 1")
        if self.n < 1:
            raise InferenceError(f"--n {self.n}: must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--temperature --top-p --max-tokens --n --seed."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=DEFAULTS["temperature"],
        help=f"sampling temperature, 0 = greedy (default {DEFAULTS['temperature']})",
    )
    parser.add_argument(
        "--top-p", type=float, default=DEFAULTS["top_p"], help=f"nucleus sampling mass (default {DEFAULTS['top_p']})"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULTS["max_tokens"],
        help=f"new tokens per completion (default {DEFAULTS['max_tokens']})",
    )
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="completions per prompt (default 1)")
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help="sampling seed; prompt i is seeded with seed+i (default 0)"
    )


def sampling_from(args: argparse.Namespace) -> Sampling:
    """The Sampling of parsed `add_sampling_options` arguments."""
    return Sampling(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, n=args.n, seed=args.seed
    )


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
        prompts.append(Prompt(number, text))
    if not prompts:
        raise InferenceError(
            f'{path}: no prompts (the file is empty); write one JSON object per line, e.g. {{"prompt": "中国的首都是"}}'
        )
    return prompts


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
