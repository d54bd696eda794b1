"""The two tokenizers behind one interface, loading, and training."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fm9g.data.cpm_tokenizer import CPMTokenizer
from fm9g.data.errors import DataError
from fm9g.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece

from .conftest import CODE, EMOJI, corpus_lines

SAMPLES = ["中国的首都是北京。", "the quick brown fox", CODE, EMOJI, "未见过的字：龘靐", "a\r\nb  c\t", ""]


def test_sentencepiece_ids_and_round_trip(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size <= 600
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    # chat markers are single pieces
    assert tok.encode("<用户>")[0] == 3 and len(tok.encode("<用户>hi<AI>")) >= 3
    assert tok.encode("<AI>") == [4]


def test_sentencepiece_pickles_and_saves(sp_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(sp_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    saved = tok.save_to(tmp_path / "hf")
    assert saved.name == "tokenizer.model" and saved.read_bytes() == sp_model.read_bytes()
    assert isinstance(load_tokenizer(tmp_path / "hf"), SentencePieceTokenizer)


def test_cpm_greedy_longest_match_and_byte_fallback(cpm_vocab: Path) -> None:
    tok = load_tokenizer(cpm_vocab)
    assert isinstance(tok, CPMTokenizer) and isinstance(tok, Tokenizer)
    # the blank line in the file takes no id
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len([line for line in cpm_vocab.read_text(encoding="utf-8").split("\n") if line.strip()])
    ids = tok.encode("中国北京")
    assert [tok.decode([i]) for i in ids] == ["中国", "北京"]
    assert [tok.decode([i]) for i in tok.encode("quick")] == ["quick"]  # longest, not "qu"
    assert [tok.decode([i]) for i in tok.encode("quiz")][:1] == ["qu"]
    # 龘 is not in the vocabulary: three UTF-8 byte tokens
    dragon = tok.encode("龘")
    assert len(dragon) == 3 and tok.decode(dragon) == "龘"
    # literal control tokens in text are not matched as BOS
    assert tok.bos_id not in tok.encode("<s>") and tok.decode(tok.encode("<s>")) == "<s>"
    assert tok.encode("<用户>") == [3]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_cpm_pickles_and_saves(cpm_vocab: Path, tmp_path: Path) -> None:
    tok = CPMTokenizer(cpm_vocab)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(CODE) == tok.encode(CODE)
    saved = tok.save_to(tmp_path)
    assert saved.read_bytes() == cpm_vocab.read_bytes()


def test_cpm_vocab_errors(tmp_path: Path) -> None:
    bad = tmp_path / "vocab.txt"
    bad.write_text('"<unk>"\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"vocab\.txt:2: not a JSON string"):
        CPMTokenizer(bad)
    bad.write_text('"<unk>"\n"a"\n', encoding="utf-8")
    with pytest.raises(DataError, match="lacks <s>, </s>"):
        CPMTokenizer(bad)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(DataError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)


def test_train_shrinks_too_large_vocab(tmp_path: Path) -> None:
    out = train_sentencepiece(["hello world", "你好世界"] * 5, tmp_path / "t.model", 5000)
    tok = load_tokenizer(out)
    assert 256 < tok.vocab_size < 5000
    assert tok.decode(tok.encode("hello 你好")) == "hello 你好"


def test_train_from_files(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(corpus_lines(50)), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"input":"问题","output":"答案"}\n', encoding="utf-8")
    out = train_sentencepiece([txt, jsonl], tmp_path / "t.model", 400)
    assert load_tokenizer(out).vocab_size == 400


def test_train_too_small_vocab_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="raise vocab_size"):
        train_sentencepiece(["hello world 你好"], tmp_path / "t.model", 50)
    assert not (tmp_path / "t.model").exists()
