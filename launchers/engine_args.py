"""vLLM engine arguments given as `--engine-arg KEY=VALUE`: checked here (login side and
job side alike), passed to vLLM's server as `--key value` and to the offline `LLM` as
`key=value` keyword arguments.  vLLM itself is not needed to parse them.
"""

from __future__ import annotations

import json
import re
from typing import Any

# vLLM arguments fm9g sets itself: a user value would fight ours, so the message
# names the option that sets it instead.
RESERVED_ENGINE_ARGS = {
    "model": "the RUN_OR_MODEL argument",
    "host": "the node's address (published in serve/endpoint.json)",
    "port": "--port",
    "api-key": "--api-key or --api-key-file",
    "served-model-name": "the run name (--name for a model folder)",
    "trust-remote-code": "--trust-remote-code",
}
_ENGINE_ARG_KEY = re.compile(r"[a-z0-9][a-z0-9-]*")


def parse_engine_arg(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` (or a bare `KEY` for an on/off flag) as vLLM's `--key value`; ValueError
    names the fault and the fix."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("_", "-").lower()
    if not _ENGINE_ARG_KEY.fullmatch(key):
        raise ValueError(f"--engine-arg {text!r}: expected KEY=VALUE, e.g. max-model-len=4096")
    if key in RESERVED_ENGINE_ARGS:
        raise ValueError(f"--engine-arg {key}: fm9g-launch sets it; use {RESERVED_ENGINE_ARGS[key]}")
    return key, (value if sep else None)


def llm_kwargs(pairs: list[tuple[str, str | None]] | tuple[tuple[str, str | None], ...]) -> dict[str, Any]:
    """Keyword arguments of the offline `vllm.LLM`: dashes become underscores, a bare KEY is
    True, and a VALUE that is JSON (4096, 0.85, true, {"k": 1}) is taken as such, else text."""
    kwargs: dict[str, Any] = {}
    for key, value in pairs:
        if value is None:
            kwargs[key.replace("-", "_")] = True
            continue
        try:
            kwargs[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.replace("-", "_")] = value
    return kwargs
