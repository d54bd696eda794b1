"""One tokenizer interface over the two FM9G tokenizers, plus training a small one.

The 2B model uses a sentencepiece `tokenizer.model`; the 8B model uses the "cpm"
`vocab.txt` (see `fm9g.data.cpm_tokenizer`). Both expose `bos_id`, `eos_id`, `unk_id`,
`vocab_size`, `encode` (no special tokens), `decode` and `save_to`; `load_tokenizer`
picks the right class from a path. `train_sentencepiece` builds a 2B-style model from
text when no tokenizer is given (tests, tiny runs): BPE with byte fallback and the chat
markers `<用户>`/`<AI>` as user-defined pieces, identity normalization so that
decode(encode(text)) == text for code, CRLF text and repeated spaces.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

from fm9g.data.cpm_tokenizer import CPMTokenizer
from fm9g.data.errors import DataError
from fm9g.rundir.atomic import write_bytes

__all__ = [
    "CPMTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "encode_many",
    "load_tokenizer",
    "train_sentencepiece",
]

CHAT_MARKERS = ("<用户>", "<AI>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the HF exporter need from a tokenizer."""

    bos_id: int
    eos_id: int
    unk_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`."""
        ...

    def save_to(self, directory: str | Path) -> Path:
        """Copy the tokenizer's files into `directory`; return the main file."""
        ...


class SentencePieceTokenizer:
    """A sentencepiece model (FM9G 2B `tokenizer.model`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            proto = self.path.read_bytes()
        except OSError as error:
            raise DataError(f"{self.path}: cannot read sentencepiece model ({error})") from None
        self._setup(proto)

    def _setup(self, proto: bytes) -> None:
        self._proto = proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as error:  # sentencepiece raises plain RuntimeError/OSError
            raise DataError(f"{self.path}: not a sentencepiece model ({error})") from None
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.unk_id = int(self._sp.unk_id())
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text in one call (the loop runs in C++)."""
        return [list(ids) for ids in self._sp.encode(texts, out_type=int)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (control tokens are dropped, byte pieces reassembled)."""
        return str(self._sp.decode([int(i) for i in ids]))

    def save_to(self, directory: str | Path) -> Path:
        """Copy the model into `directory` as tokenizer.model."""
        return write_bytes(Path(directory) / "tokenizer.model", self._proto)

    def __getstate__(self) -> dict[str, Any]:
        # The C++ processor does not pickle; loader workers rebuild it from the proto.
        return {"path": str(self.path), "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._setup(state["proto"])


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode many texts, batched when the tokenizer supports it."""
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return list(batch(texts))
    return [tokenizer.encode(text) for text in texts]


def _looks_like_cpm_vocab(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096)
    for line in head.split(b"\n")[:-1] or [head]:
        if not line.strip():
            continue
        try:
            return isinstance(json.loads(line.decode("utf-8")), str)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    return False


def load_tokenizer(path: str | Path) -> SentencePieceTokenizer | CPMTokenizer:
    """Open a tokenizer: a sentencepiece .model, a cpm vocab.txt, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "vocab.txt", "vocabs.txt"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise DataError(f"{path}: no tokenizer.model, vocab.txt or vocabs.txt in this directory")
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file does not exist")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".txt" or _looks_like_cpm_vocab(path):
        return CPMTokenizer(path)
    return SentencePieceTokenizer(path)


def _training_sentences(source: Iterable[str | Path]) -> Iterator[str]:
    """Text lines from strings, or from .txt / .jsonl files (input and output fields)."""
    for item in source:
        if isinstance(item, Path):
            with open(item, encoding="utf-8", errors="replace", newline="\n") as handle:
                for line in handle:
                    if item.suffix == ".jsonl":
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if isinstance(row, dict):
                            for key in ("input", "output"):
                                if isinstance(row.get(key), str) and row[key]:
                                    yield row[key]
                    elif line.strip():
                        yield line.rstrip("\n")
        else:
            yield str(item)


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(
    text_iter_or_files: Iterable[str | Path],
    out_path: str | Path,
    vocab_size: int,
    *,
    max_sentences: int = 200_000,
) -> Path:
    """Train a 2B-style BPE sentencepiece model on text; shrink vocab_size if the corpus is too small."""
    # Path items are files (.txt lines, .jsonl input/output); str items are text.
    sentences = list(itertools.islice(_training_sentences(text_iter_or_files), max_sentences))
    # Bounded sample: training time grows with the corpus; a few hundred KB is plenty.
    sentences = [s for s in sentences if s]
    if not sentences:
        raise DataError("train_sentencepiece: no text to train on")
    size = vocab_size
    for _ in range(4):
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type="bpe",
                vocab_size=size,
                byte_fallback=True,
                character_coverage=1.0,
                user_defined_symbols=list(CHAT_MARKERS),
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                # Exact round trips for code and CRLF text: no NFKC, no dummy prefix,
                # keep repeated whitespace.
                normalization_rule_name="identity",
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                max_sentence_length=1 << 16,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as error:
            high = _TOO_HIGH.search(str(error))
            if high:
                size = int(high.group(2))  # the largest size this corpus supports
                continue
            low = _TOO_LOW.search(str(error))
            if low:
                raise DataError(
                    f"train_sentencepiece: vocab_size {vocab_size} is below the {low.group(2)} pieces "
                    "that byte fallback and this corpus's characters need; raise vocab_size"
                ) from None
            raise DataError(f"train_sentencepiece failed: {error}") from None
        return write_bytes(out_path, model.getvalue())
    raise DataError(f"train_sentencepiece: could not find a vocabulary size that fits (last tried {size})")
