"""Convert plain text (one sample per line) into the FM9G jsonl format.

Each non-blank line becomes `{"input":"","output":<line stripped>}` (pretraining data
has an empty input; the loss is computed on output only), written without ASCII
escaping, exactly as the guide's convert_txt2jsonl.py does. Lines are split on b"\\n"
only, never with str.splitlines(), so U+2028, form feeds or a lone \\r inside a line
do not create extra samples; a trailing \\r (CRLF files) is removed by the strip.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from fm9g.data.errors import DataError
from fm9g.rundir.atomic import atomic_output

# Read this many bytes at a time; lines are re-joined across block edges.
_BLOCK_BYTES = 8 << 20


def txt_line_to_jsonl(text: str) -> str | None:
    """The jsonl line (without newline) for one text line, or None for a blank line."""
    stripped = text.strip()
    if not stripped:
        return None
    # Compact separators: the guide shows {"input":"","output":"..."} without spaces.
    return json.dumps({"input": "", "output": stripped}, ensure_ascii=False, separators=(",", ":"))


def iter_text_lines(source: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line bytes without the newline) of a file."""
    number = 0
    rest = b""
    with open(source, "rb") as handle:
        while True:
            block = handle.read(_BLOCK_BYTES)
            if not block:
                break
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                number += 1
                yield number, raw
    if rest:
        yield number + 1, rest


def convert_lines(lines: Iterable[tuple[int, bytes]], source: str) -> Iterator[str]:
    """Turn numbered raw text lines into jsonl lines; non-UTF-8 input is a DataError."""
    for number, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{source}:{number}: not valid UTF-8 ({error.reason} at byte {error.start}); "
                "re-encode the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`)"
            ) from None
        converted = txt_line_to_jsonl(text)
        if converted is not None:
            yield converted


def txt2jsonl(source: str | Path, dest: str | Path) -> int:
    """Convert the text file `source` into jsonl at `dest` (atomically); return lines written."""
    source, dest = Path(source), Path(dest)
    if source.resolve() == dest.resolve():
        raise DataError(f"{source}: txt2jsonl output must differ from its input")
    written = 0
    with atomic_output(dest) as out:
        for converted in convert_lines(iter_text_lines(source), str(source)):
            out.write(converted.encode("utf-8") + b"\n")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m fm9g.data.txt2jsonl SRC.txt DST.jsonl`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fm9g.data.txt2jsonl SRC.txt DST.jsonl", file=sys.stderr)
        return 2
    try:
        count = txt2jsonl(args[0], args[1])
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} lines to {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
