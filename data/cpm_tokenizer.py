"""The 8B "cpm" tokenizer: a vocab.txt of JSON strings, greedy longest match, byte fallback.

Format: one JSON-encoded string per line, the id of a token is its position among the
non-empty lines. Encoding scans left to right and takes the longest vocabulary entry
that starts at the current character; a character with no entry is emitted as the
`<0xNN>` tokens of its UTF-8 bytes. Control tokens (`<unk>`, `<s>`, `</s>`) and the byte
tokens themselves are never matched from text, so data that literally contains "<s>"
cannot inject a BOS (sentencepiece treats control symbols the same way); chat markers
such as `<用户>`/`<AI>` are ordinary entries and do match.

`hf_tokenizer_json` writes the same algorithm as a Hugging Face `tokenizer.json` that the
`tokenizers` library runs with no custom code (see its docstring for how, and for the two
places where it cannot be exact).
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

    def hf_tokenizer_json(self) -> dict[str, Any]:
        """This tokenizer as a Hugging Face `tokenizer.json` (PreTrainedTokenizerFast, vLLM).

        The `tokenizers` library has no greedy-longest-match model with byte fallback
        (WordPiece matches greedily but turns a whole word into <unk> where nothing matches,
        and scans every prefix of the word).  So the matching is done by the pre-tokenizer:
        a `Split` whose regex is the vocabulary's trie, alternatives ordered so that the
        backtracking engine (Oniguruma) takes the longest entry at each position, or else
        exactly one character.  Each piece is then either a vocabulary entry, which the BPE
        model (no merges, `ignore_merges`) maps to its id, or a single character that is no
        entry, which BPE's `byte_fallback` turns into the `<0xNN>` tokens of its UTF-8 bytes.
        Control and byte tokens are not in the trie, so text never matches them: the same
        ids through `tokenizers.Tokenizer`, `PreTrainedTokenizerFast(tokenizer_file=...)` and
        `AutoTokenizer` (whose special tokens come from tokenizer_config.json, with
        `split_special_tokens` so that "<s>" in text stays text).

        Where it differs from `encode`/`decode` (never on valid UTF-8 text with a complete
        vocabulary): a vocabulary without some `<0xNN>` token gives <unk> for the whole
        character here instead of for that one byte; entries holding lone surrogates are
        left out (a Rust string cannot hold them); of an entry listed twice only the first id
        is kept (as `encode` does), so `decode` drops the later id where ours renders it; and
        `decode` of byte tokens that are not valid UTF-8 yields one U+FFFD per byte here,
        where Python's "replace" yields one per maximal invalid subsequence.
        """
        vocab = {token: index for token, index in self._ids.items() if not _has_surrogate(token)}
        bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            # No added tokens: those are matched in raw text before the pre-tokenizer, so
            # "<s>" typed in a prompt would become BOS.  transformers registers <s>, </s>
            # and <unk> from tokenizer_config.json, where split_special_tokens stops that.
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"Regex": _trie_regex([t for t in self._match if not _has_surrogate(t)])},
                "behavior": "Isolated",
                "invert": False,
            },
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [self.bos_id], "tokens": ["<s>"]}},
            },
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": "<unk>",
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": True,
                "ignore_merges": True,
                "vocab": vocab,
                "merges": [],
            },
        }

    def hf_tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json beside `hf_tokenizer_json` (AutoTokenizer -> PreTrainedTokenizerFast)."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            # "<s>" typed in a prompt stays text, as in `encode` (tokenizers' encode_special_tokens).
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
        }

    def save_hf(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`; return tokenizer.json."""
        directory = Path(directory)
        write_text(directory / "tokenizer_config.json", json.dumps(self.hf_tokenizer_config(), indent=2) + "\n")
        return write_text(directory / "tokenizer.json", json.dumps(self.hf_tokenizer_json(), ensure_ascii=False))

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers get the vocabulary text, not the derived tables.
        return {"path": str(self.path), "text": self._text}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._setup(state["text"])


_FANOUT = 32  # siblings per regex group before they are split into guarded blocks


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _regex_char(char: str) -> str:
    # Letters and digits of any script are literal in Oniguruma; everything else is written
    # as a code point so no character can act as regex syntax.
    return char if char.isalnum() else f"\\x{{{ord(char):X}}}"


def _trie_regex(entries: list[str]) -> str:
    """A regex that matches, at any position, the longest entry there, else one character.

    Nested groups follow the trie: a child is tried before the node ends, and a node that
    is an entry itself makes its children optional (greedy `?`), so backtracking returns the
    deepest entry on the path: the longest match.  Siblings start with different characters,
    so their order cannot change which one matches."""
    trie: dict[str, Any] = {}
    for entry in entries:
        node = trie
        for char in entry:
            node = node.setdefault(char, {})
        node[""] = {}  # end of an entry

    def children(node: dict[str, Any]) -> str:
        branches = [(char, _regex_char(char) + tail(child)) for char, child in sorted(node.items()) if char]
        return alternatives(branches)

    def alternatives(branches: list[tuple[str, str]]) -> str:
        if len(branches) == 1:
            return branches[0][1]
        if len(branches) <= _FANOUT:
            return "(?:" + "|".join(text for _, text in branches) + ")"
        # Thousands of siblings (every CJK character at the root) would be tried one by one
        # at every position; a lookahead on each block's character range skips whole blocks.
        size = max(_FANOUT, -(-len(branches) // _FANOUT))
        blocks = [branches[start : start + size] for start in range(0, len(branches), size)]
        guarded = [
            (block[0][0], f"(?=[{_regex_char(block[0][0])}-{_regex_char(block[-1][0])}]){alternatives(block)}")
            for block in blocks
        ]
        return "(?:" + "|".join(text for _, text in guarded) + ")"

    def tail(node: dict[str, Any]) -> str:
        # A run of single-child nodes that end no entry is plain text: walked in a loop, so a
        # long entry neither recurses deeply here nor nests groups in the regex.
        prefix = ""
        while "" not in node and len(node) == 1:
            [(char, node)] = node.items()
            prefix += _regex_char(char)
        if not any(node):  # a leaf: only the end marker
            return prefix
        group = children(node)
        if "" not in node:
            return prefix + group
        return prefix + (group if group.startswith("(?:") else f"(?:{group})") + "?"

    body = children(trie) if trie else ""
    # [\s\S]: one character of any kind, newlines included (no match -> byte fallback).
    return f"{body}|[\\s\\S]" if body else "[\\s\\S]"
