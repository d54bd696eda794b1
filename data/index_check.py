"""Validate jsonl lines for indexing: one JSON object per line with a string `output`.

A line is valid when it is UTF-8, parses as one JSON object, has `output` as a string
and `input` (optional) as a string or null. Raw control characters such as \\r or NUL
inside strings are accepted (json.loads(strict=False) semantics): the fast msgspec
decoder rejects them, so a line it refuses is re-checked with the stdlib parser before
it is called bad. Such a line is kept but reported as a warning (`WARNING_CONTROL`),
because strict JSON parsers elsewhere (jq, most languages' defaults) reject it. Lines are always split on b"\\n" by the caller, never by universal newlines.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

import msgspec
import numpy as np

ErrorKind = Literal[
    "invalid_utf8",
    "invalid_json",
    "blank_line",
    "not_object",
    "missing_output",
    "bad_field_type",
    "empty_file",
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)

# What to do about each kind, appended to the error message.
FIX_HINT: dict[str, str] = {
    "invalid_utf8": "re-encode the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`)",
    "invalid_json": "each line must be one complete JSON object",
    "blank_line": "remove blank lines (jsonl has one JSON object per line)",
    "not_object": 'each line must be an object like {"input": "", "output": "..."}',
    "missing_output": 'add an "output" string (pretraining text goes in "output")',
    "bad_field_type": '"output" must be a string and "input" a string or null',
    "empty_file": "remove the empty file from the inputs",
}

# Warning kind of a kept line whose strings hold raw control characters (U+0000-U+001F).
WARNING_CONTROL = "raw_control_characters"

_DECODER = msgspec.json.Decoder()
_MISSING = object()

LineError = tuple[ErrorKind, str]


def decode_json(body: bytes) -> Any:
    """Decode one JSON value; msgspec first, the lenient stdlib parser for what it refuses."""
    try:
        return _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return json.loads(body.decode("utf-8"), strict=False)


def check_fields(obj: Any) -> LineError | None:
    """The error of a decoded line, or None when it is a valid sample object."""
    if type(obj) is not dict:
        kind = "array" if isinstance(obj, list) else type(obj).__name__
        return "not_object", f"the line is a JSON {kind}, not an object"
    output = obj.get("output", _MISSING)
    if output is _MISSING:
        return "missing_output", 'no "output" field'
    if type(output) is not str:
        return "bad_field_type", f'"output" is {type(output).__name__}, not a string'
    given = obj.get("input")
    if given is not None and type(given) is not str:
        return "bad_field_type", f'"input" is {type(given).__name__}, not a string or null'
    return None


def classify_line(body: bytes) -> tuple[Any, LineError | None]:
    """Decode one line (without its newline); return (object or None, error or None)."""
    if not body.strip():
        return None, ("blank_line", "blank line")
    if body.startswith(b"\xef\xbb\xbf"):
        return None, ("invalid_json", "the line starts with a UTF-8 byte-order mark (BOM); save the file without BOM")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, ("invalid_utf8", f"not valid UTF-8 ({error.reason} at byte {error.start})")
    try:
        obj = _DECODER.decode(body)
    except msgspec.DecodeError:
        try:
            obj = json.loads(text, strict=False)
        except json.JSONDecodeError as error:
            return None, ("invalid_json", f"invalid JSON ({error.msg} at column {error.colno})")
        except RecursionError:
            return None, ("invalid_json", "invalid JSON (nested too deeply)")
        # json.loads accepts lone surrogate escapes that no tokenizer can encode.
        for key in ("input", "output"):
            value = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return None, ("invalid_json", f'"{key}" contains a lone surrogate escape')
    problem = check_fields(obj)
    return (None, problem) if problem else (obj, None)


def _fast_objects(block: bytes, starts: list[int], ends: list[int]) -> list[Any] | None:
    """Decode all lines in one msgspec call when that provably maps one object per line.

    msgspec's decode_lines reads a stream of whitespace-separated values, not lines. It
    is exact here when every line starts with "{" and ends with "}" (before an optional
    \r): a break between "}" and "{" is only legal between two top-level values, so no
    value can span lines, and an equal count means no line holds two. Anything else
    (leading spaces, blank lines, a BOM) takes the line-by-line path.
    """
    if not starts:
        return []
    arr = np.frombuffer(block, dtype=np.uint8)
    first = arr[np.asarray(starts, dtype=np.int64)]
    last_at = np.asarray(ends, dtype=np.int64) - 1
    if last_at.min() < 0 or not (first == 0x7B).all():
        return None
    last = arr[last_at]
    carriage = last == 0x0D
    if carriage.any():
        shifted = last_at[carriage] - 1
        if shifted.min() < 0:
            return None
        last = last.copy()
        last[carriage] = arr[shifted]
    if not (last == 0x7D).all():
        return None
    try:
        # A memoryview avoids copying the block; lines start at starts[0] == 0 or later.
        objects = _DECODER.decode_lines(memoryview(block)[starts[0] : min(ends[-1] + 1, len(block))])
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if len(objects) != len(starts):
        return None
    for obj in objects:
        if type(obj) is not dict or type(obj.get("output")) is not str:
            return None
        given = obj.get("input")
        if given is not None and type(given) is not str:
            return None
    return objects


def has_raw_control(body: bytes) -> bool:
    """True when a line that the lenient parser accepted holds raw control characters in a string."""
    try:
        json.loads(body.decode("utf-8"))
    except json.JSONDecodeError as error:
        return error.msg.startswith("Invalid control character")
    except (UnicodeDecodeError, RecursionError):
        return False
    return False


def check_lines(
    block: bytes, starts: list[int], ends: list[int], warnings: list[int] | None = None
) -> tuple[list[Any], list[tuple[int, LineError]]]:
    """Check the lines block[starts[i]:ends[i]]; return (objects, [(i, error)]).

    objects[i] is None for a bad line. The common all-valid case costs one msgspec
    call for the block and a few type checks per line. `warnings`, when given, receives
    the numbers of kept lines with raw control characters in their strings.
    """
    fast = _fast_objects(block, starts, ends)
    if fast is not None:
        return fast, []
    decode = _DECODER.decode
    objects: list[Any] = []
    bad: list[tuple[int, LineError]] = []
    append = objects.append
    for index, (start, end) in enumerate(zip(starts, ends)):
        body = block[start:end]
        try:
            obj = decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError):
            obj, problem = classify_line(body)
            if problem is not None:
                bad.append((index, problem))
            elif warnings is not None and has_raw_control(body):
                warnings.append(index)
            append(obj)
            continue
        problem = check_fields(obj)
        if problem is None:
            append(obj)
            continue
        bad.append((index, problem))
        append(None)
    return objects, bad
