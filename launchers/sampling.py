"""Sampling parameters of `infer`: vLLM's `SamplingParams` names, ranges and meaning, on
both engines, checked against the engine that will run them before any job is queued.

A parameter comes from the command line (`--top-k 20`), or from a prompt file line,
either at the top level (`{"prompt": "...", "top_k": 20, "stop": ["\\n"]}`) or in a
`sampling` object (`{"prompt": "...", "sampling": {"top_k": 20}}`); a line's values
override the command line's for that prompt only.

The ranges are vLLM's own (`vllm/sampling_params.py`, `SamplingParams._verify_args` and
`_verify_greedy_sampling`): what vLLM would refuse at run time, inside a job, after the
model loaded, is refused here first, naming the file, line and field.  Each parameter
is listed with the engines that honour it; one that an engine cannot honour is refused
for that engine (and for `auto`, which may pick either), never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from fm9g.launchers.errors import InferenceError

EngineName = Literal["auto", "vllm", "transformers"]


class SamplingError(InferenceError):
    """A sampling parameter that is unknown, out of range, or not honoured by the engine."""


DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "n": 1, "seed": 0}

# vLLM clamps temperatures below this to greedy (vllm/sampling_params.py _SAMPLING_EPS).
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of an infer run, with vLLM's names, defaults and meaning.

    The first five are always recorded; the rest appear in a record only when set."""

    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    max_tokens: int = DEFAULTS["max_tokens"]
    n: int = DEFAULTS["n"]
    seed: int = DEFAULTS["seed"]
    top_k: int = 0  # 0 (or -1): all tokens (vLLM's default)
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0  # generated tokens only, as vLLM
    frequency_penalty: float = 0.0  # generated tokens only, as vLLM
    repetition_penalty: float = 1.0  # prompt and generated tokens, as vLLM and transformers
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    bad_words: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), bias clamped to [-100, 100] as vLLM
    allowed_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def to_dict(self) -> dict[str, Any]:
        """The five always-recorded fields, then every other field that differs from its default."""
        out = {name: getattr(self, name) for name in DEFAULTS}
        for spec in fields(self):
            if spec.name in out:
                continue
            value = getattr(self, spec.name)
            if value != spec.default:
                out[spec.name] = (
                    [list(pair) for pair in value]
                    if spec.name == "logit_bias"
                    else (list(value) if isinstance(value, tuple) else value)
                )
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of vllm.SamplingParams: the five always, the rest only when set
        (an older vLLM without, say, bad_words still takes a request that does not use it)."""
        kwargs = self.to_dict()
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = dict(self.logit_bias)
        if kwargs.get("top_k") == -1:
            kwargs["top_k"] = 0  # vLLM: 0 (or -1) is "all tokens"; 0 is the current spelling
        return kwargs


# ------------------------------------------------------------------ the parameter table


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(f"expected a number, got {json.dumps(value, ensure_ascii=False)}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingError(f"expected an integer, got {json.dumps(value, ensure_ascii=False)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingError(f"expected true or false, got {json.dumps(value, ensure_ascii=False)}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise SamplingError(f"expected a string or a list of strings, got {json.dumps(value, ensure_ascii=False)}")
    if any(not s for s in items):
        raise SamplingError(
            "an empty string cannot be matched; remove it"
        )  # vLLM: "stop cannot contain an empty string"
    return tuple(items)


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise SamplingError(f"expected a list of token ids, got {json.dumps(value, ensure_ascii=False)}")
    return tuple(dict.fromkeys(value))


def _bias(value: Any) -> tuple[tuple[int, float], ...]:
    pairs = value.items() if isinstance(value, dict) else value
    try:
        return tuple((int(token), min(100.0, max(-100.0, _float(bias)))) for token, bias in pairs)
    except (TypeError, ValueError) as exc:
        raise SamplingError(
            f'expected {{"TOKEN_ID": BIAS, ...}}, got {json.dumps(value, ensure_ascii=False)} ({exc})'
        ) from None


BOTH = frozenset({"vllm", "transformers"})
VLLM_ONLY = frozenset({"vllm"})

# name -> (parse a JSON value, the engines that honour it)
PARAMETERS: dict[str, tuple[Callable[[Any], Any], frozenset[str]]] = {
    "temperature": (_float, BOTH),
    "top_p": (_float, BOTH),
    "max_tokens": (_int, BOTH),
    "n": (_int, BOTH),
    "seed": (_int, BOTH),
    "top_k": (_int, BOTH),
    "min_p": (_float, BOTH),
    "min_tokens": (_int, BOTH),
    "presence_penalty": (_float, BOTH),
    "frequency_penalty": (_float, BOTH),
    "repetition_penalty": (_float, BOTH),
    "stop": (_strings, BOTH),
    "stop_token_ids": (_ints, BOTH),
    "include_stop_str_in_output": (_bool, BOTH),
    "ignore_eos": (_bool, BOTH),
    "bad_words": (_strings, BOTH),
    "logit_bias": (_bias, BOTH),
    "allowed_token_ids": (_ints, BOTH),
    "skip_special_tokens": (_bool, BOTH),
    "spaces_between_special_tokens": (_bool, VLLM_ONLY),
}

# vLLM SamplingParams fields an infer output line has no place for, and why.
REFUSED = {
    "logprobs": "infer writes text, not log-probabilities; use the server (/v1/completions with logprobs)",
    "prompt_logprobs": "infer writes text, not log-probabilities",
    "detokenize": "infer writes text; detokenize=false would leave it empty",
    "output_kind": "internal to vLLM's streaming",
    "structured_outputs": "not wired here; use the vLLM server's structured outputs",
    "guided_decoding": "not wired here; use the vLLM server's structured outputs",
    "best_of": "removed from vLLM (V1 engine); use n",
}

# Other libraries' names for the same thing: refused with the name to use.
ALIASES = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "stop_strings": "stop",
    "min_new_tokens": "min_tokens",
    "stop_sequences": "stop",
    "eos_token_id": "stop_token_ids",
}


def check_ranges(sampling: Sampling) -> None:
    """vLLM's `_verify_args` and `_verify_greedy_sampling`, which bind on every engine here."""
    s = sampling
    problems = []
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        problems.append(f"temperature {s.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < s.top_p <= 1:
        problems.append(f"top_p {s.top_p}: must be in (0, 1]")
    if s.max_tokens < 1:
        problems.append(f"max_tokens {s.max_tokens}: must be at least 1")
    if s.n < 1:
        problems.append(f"n {s.n}: must be at least 1")
    if s.top_k < -1:
        problems.append(f"top_k {s.top_k}: must be 0 (all tokens) or at least 1")
    if not 0 <= s.min_p <= 1:
        problems.append(f"min_p {s.min_p}: must be in [0, 1]")
    if not 0 <= s.min_tokens <= s.max_tokens:
        problems.append(f"min_tokens {s.min_tokens}: must be in [0, max_tokens={s.max_tokens}]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not -2 <= value <= 2:
            problems.append(f"{name} {value}: must be in [-2, 2]")
    if not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        problems.append(f"repetition_penalty {s.repetition_penalty}: must be > 0 (1 = off)")
    if s.greedy and s.n > 1:
        problems.append(
            f"n {s.n} with temperature {s.temperature}: greedy decoding gives one completion; "
            "set n 1, or a temperature above 0 for n different samples"
        )
    if problems:
        raise SamplingError("; ".join(problems))


_DEFAULTS = {spec.name: spec.default for spec in fields(Sampling)}


def check_engine(sampling: Sampling, engine: EngineName) -> None:
    """Refuse what `engine` would refuse or ignore (`auto`: what either engine would)."""
    engines = {"vllm", "transformers"} if engine == "auto" else {engine}
    if "vllm" in engines and sampling.temperature > 2:
        raise SamplingError(
            f"temperature {sampling.temperature}: vLLM takes [0, 2]"
            + (" and --engine auto may run vLLM; use --engine transformers for more" if engine == "auto" else "")
        )
    for name, (_, honoured) in PARAMETERS.items():
        if getattr(sampling, name) != _DEFAULTS[name] and not engines <= honoured:
            missing = sorted(engines - honoured)
            raise SamplingError(
                f"{name}: the {' and '.join(missing)} engine does not honour it"
                + (" (--engine auto may pick it); use --engine vllm" if engine == "auto" else "; use --engine vllm")
            )


def parse_overrides(record: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields of a prompt file line (top level and its `sampling` object), parsed.

    At the top level a name that is not a sampling parameter is the line's own data and
    is ignored; inside `sampling` every name must be one."""
    nested = record.get("sampling", {})
    if not isinstance(nested, dict):
        raise SamplingError(f"'sampling' must be an object of sampling parameters, got {type(nested).__name__}")
    out: dict[str, Any] = {}
    for strict, source in ((False, record), (True, nested)):
        for name, value in source.items():
            where = f"sampling.{name}" if strict else name
            if name in ALIASES:
                raise SamplingError(f"{where}: vLLM calls it {ALIASES[name]!r}; rename the field")
            if name in REFUSED:
                raise SamplingError(f"{where}: not accepted by infer: {REFUSED[name]}")
            if name not in PARAMETERS:
                if strict:
                    raise SamplingError(f"{where}: not a sampling parameter; known: {', '.join(PARAMETERS)}")
                continue
            try:
                out[name] = PARAMETERS[name][0](value)
            except SamplingError as exc:
                raise SamplingError(f"{where}: {exc}") from None
    return out


def merged(base: Sampling, overrides: Mapping[str, Any]) -> Sampling:
    """`base` with a prompt line's overrides (ranges checked again on the result)."""
    return replace(base, **overrides) if overrides else base


def from_json(text: str) -> Sampling:
    """A Sampling from `to_json()` output (the infer job's --sampling-json)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SamplingError(f"--sampling-json: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise SamplingError("--sampling-json: expected a JSON object")
    return Sampling(**parse_overrides({"sampling": values}))


# ------------------------------------------------------------------ command-line options


def _pair(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), min(100.0, max(-100.0, float(bias)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TOKEN_ID=BIAS, e.g. 42=-100") from None


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """One option per sampling parameter (vLLM's names with dashes)."""
    group = parser.add_argument_group(
        "sampling (vLLM's SamplingParams; a prompt file line may set any of them for itself)"
    )
    add = group.add_argument
    add("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy (default %(default)s)")
    add("--top-p", type=float, default=DEFAULTS["top_p"], help="nucleus sampling mass (default %(default)s)")
    add(
        "--max-tokens", type=int, default=DEFAULTS["max_tokens"], help="new tokens per completion (default %(default)s)"
    )
    add("--n", type=int, default=DEFAULTS["n"], help="completions per prompt (default 1; >1 needs temperature > 0)")
    add("--seed", type=int, default=DEFAULTS["seed"], help="prompt i is seeded with seed+i (default 0)")
    add("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: all)")
    add("--min-p", type=float, default=0.0, help="drop tokens below min_p x the likeliest's probability")
    add("--min-tokens", type=int, default=0, help="new tokens before EOS or a stop token may end a completion")
    add("--presence-penalty", type=float, default=0.0, help="[-2, 2], on tokens already generated")
    add("--frequency-penalty", type=float, default=0.0, help="[-2, 2], times each generated token's count")
    add("--repetition-penalty", type=float, default=1.0, help="> 0, on prompt and generated tokens (1 = off)")
    add("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    add("--stop-token-ids", type=int, nargs="+", default=[], metavar="ID", help="stop at these token ids")
    add("--include-stop-str-in-output", action="store_true", help="keep the stop text in the completion")
    add("--ignore-eos", action="store_true", help="generate past EOS, up to max-tokens")
    add("--bad-words", action="append", default=[], metavar="TEXT", help="never generate this text (repeatable)")
    add("--logit-bias", action="append", type=_pair, default=[], metavar="ID=BIAS", help="add BIAS to a token's logit")
    add("--allowed-token-ids", type=int, nargs="+", default=[], metavar="ID", help="generate only these token ids")
    add(
        "--skip-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop special tokens from text",
    )
    add(
        "--spaces-between-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(vLLM only) spaces between special tokens in text",
    )


def sampling_from(args: argparse.Namespace) -> Sampling:
    """The Sampling of parsed `add_sampling_options` arguments."""
    return Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        n=args.n,
        seed=args.seed,
        top_k=args.top_k,
        min_p=args.min_p,
        min_tokens=args.min_tokens,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        include_stop_str_in_output=args.include_stop_str_in_output,
        ignore_eos=args.ignore_eos,
        bad_words=tuple(args.bad_words),
        logit_bias=tuple(args.logit_bias),
        allowed_token_ids=tuple(args.allowed_token_ids),
        skip_special_tokens=args.skip_special_tokens,
        spaces_between_special_tokens=args.spaces_between_special_tokens,
    )
