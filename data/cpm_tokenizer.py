"""The 8B "cpm" tokenizer: a vocab.txt of JSON strings, greedy longest match, byte fallback.

Format: one JSON-encoded string per line, the id of a token is its position among the
non-empty lines. Encoding scans left to right and takes the longest vocabulary entry
that starts at the current character; a character with no entry is emitted as the
`<0xNN>` tokens of its UTF-8 bytes. Control tokens (`<unk>`, `<s>`, `</s>`) and the byte
tokens themselves are never matched from text, so data that literally contains "<s>"
cannot inject a BOS (sentencepiece treats control symbols the same way); chat markers
such as `<用户>`/`<AI>` are ordinary entries and do match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fm9g.data.errors import DataError
from fm9g.rundir.atomic import write_text

_CONTROL = ("<unk>", "<s>", "</s>")


def _byte_token(value: int) -> str:
    return f"<0x{value:02X}>"


class CPMTokenizer:
    """Greedy longest-match tokenizer over a cpm `vocab.txt` (FM9G 8B)."""

    def __init__(self, vocab_path: str | Path) -> None:
        self.path = Path(vocab_path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{self.path}: cannot read cpm vocabulary ({error})") from None
        self._setup(text)

    def _setup(self, text: str) -> None:
        self._text = text
        tokens: list[str] = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue  # ids count non-empty lines only
            try:
                token = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{self.path}:{number}: not a JSON string; each line of a cpm vocab is one") from None
            if not isinstance(token, str):
                raise DataError(f"{self.path}:{number}: expected a JSON string, got {type(token).__name__}")
            tokens.append(token)
        self._tokens = tokens
        self._ids: dict[str, int] = {}
        for index, token in enumerate(tokens):
            self._ids.setdefault(token, index)
        missing = [name for name in _CONTROL if name not in self._ids]
        if missing:
            raise DataError(f"{self.path}: cpm vocabulary lacks {', '.join(missing)}; add them as lines")
        self.unk_id = self._ids["<unk>"]
        self.bos_id = self._ids["<s>"]
        self.eos_id = self._ids["</s>"]
        self.vocab_size = len(tokens)
        # Byte fallback table; a missing byte token degrades to <unk>.
        self._byte_ids = [self._ids.get(_byte_token(b), self.unk_id) for b in range(256)]
        self._byte_of_id: dict[int, int] = {
            self._ids[_byte_token(b)]: b for b in range(256) if _byte_token(b) in self._ids
        }
        # Matchable entries keyed by their first character, with the longest length per
        # character, so each position tries at most that many slices (a flat prefix table).
        self._match: dict[str, int] = {}
        self._longest: dict[str, int] = {}
        skip = set(_CONTROL) | {_byte_token(b) for b in range(256)}
        for token, index in self._ids.items():
            if not token or token in skip:
                continue
            self._match[token] = index
            first = token[0]
            if len(token) > self._longest.get(first, 0):
                self._longest[first] = len(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ids: list[int] = []
        match, longest, byte_ids = self._match, self._longest, self._byte_ids
        position, end = 0, len(text)
        while position < end:
            char = text[position]
            size = min(longest.get(char, 0), end - position)
            while size > 0:
                found = match.get(text[position : position + size])
                if found is not None:
                    ids.append(found)
                    position += size
                    break
                size -= 1
            else:
                # surrogatepass: a lone surrogate from json.loads still becomes bytes.
                ids.extend(byte_ids[b] for b in char.encode("utf-8", "surrogatepass"))
                position += 1
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; runs of byte tokens are reassembled into UTF-8 characters."""
        parts: list[str] = []
        pending = bytearray()
        for index in ids:
            byte = self._byte_of_id.get(index)
            if byte is not None:
                pending.append(byte)
                continue
            if pending:
                parts.append(pending.decode("utf-8", "replace"))
                pending.clear()
            # Control tokens are rendered literally, as the original CPM9GTokenizer does.
            parts.append(self._tokens[index])
        if pending:
            parts.append(pending.decode("utf-8", "replace"))
        return "".join(parts)

    def save_to(self, directory: str | Path) -> Path:
        """Copy the vocabulary into `directory` (as vocab.txt) for an HF export."""
        return write_text(Path(directory) / "vocab.txt", self._text)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers get the vocabulary text, not the derived tables.
        return {"path": str(self.path), "text": self._text}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._setup(state["text"])
