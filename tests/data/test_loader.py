"""PackedLoader: batch format, sampling, sharding, epochs, resume, workers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index
from fm9g.data.loader import PackedLoader
from fm9g.data.mixture import load_mixture
from fm9g.data.samples import make_windows
from fm9g.data.tokenizer import load_tokenizer

from .conftest import corpus_lines, write_jsonl

MAX_LEN = 64


def _task(tmp: Path, name: str, rows: list[dict], **entry: Any) -> dict[str, Any]:
    src = write_jsonl(tmp / "raw" / f"{name}.jsonl", rows)
    build_index(src, tmp / name)
    base = {"dataset_name": name, "task_name": name, "abs_weight": 1.0, "path": str(tmp / name), "allow_repeat": True}
    base.update(entry)
    return base


@pytest.fixture
def mixture(tmp_path: Path) -> list[dict[str, Any]]:
    lm = [{"input": "", "output": f"{i}:" + text} for i, text in enumerate(corpus_lines(60, seed=1))]
    qa = [{"input": f"问题{i}：" + t[:12], "output": f"答{i}" + t[:20]} for i, t in enumerate(corpus_lines(40, seed=2))]
    return [
        _task(tmp_path, "lm", lm, abs_weight=0.6, ave_tokens_per_line=30),
        _task(tmp_path, "qa", qa, abs_weight=0.4),
    ]


def _loader(entries: list[dict], tok: Path, tmp_path: Path, **kw: Any) -> PackedLoader:
    kw.setdefault("batch_size", 3)
    kw.setdefault("max_length", MAX_LEN)
    return PackedLoader(load_mixture(entries, base_dir=tmp_path), load_tokenizer(tok), **kw)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
        and a.keys() == b.keys()
    )


def _segments(batch: dict[str, Any]):  # type: ignore[no-untyped-def]
    """(row, start, end, task) of each real sample."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r].tolist()
        tasks = batch["task_ids"][r].tolist()
        start = 0
        for i in range(1, len(seg) + 1):
            if i == len(seg) or seg[i] != seg[start]:
                if tasks[start] >= 0:
                    out.append((r, start, i, tasks[start]))
                start = i
    return out


def test_batch_format_and_shifted_targets(mixture: list[dict], sp_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(sp_model)
    loader = _loader(mixture, sp_model, tmp_path)
    batch = next(loader)
    B, L = 3, MAX_LEN
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == torch.int64
    assert batch["targets"].dtype == torch.int64 and batch["position_ids"].dtype == torch.int64
    assert batch["segment_ids"].dtype == torch.int32 and batch["task_ids"].dtype == torch.int32
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["task_names"] == ["lm", "qa"]
    real = batch["task_ids"] >= 0
    assert batch["num_tokens"] == int(real.sum())
    assert (batch["input_ids"][~real] == 0).all() and (batch["targets"][~real] == -100).all()
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == B * L and batch["max_seqlen"] == max(np.diff(cu))
    flat_seg = (batch["segment_ids"] + torch.arange(B).unsqueeze(1) * 1000).reshape(-1).tolist()
    assert [i for i in range(1, B * L) if flat_seg[i] != flat_seg[i - 1]] == cu[1:-1]
    for r, start, end, task in _segments(batch):
        src = batch["input_ids"][r, start:end].tolist()
        tgt = batch["targets"][r, start:end].tolist()
        assert batch["position_ids"][r, start:end].tolist() == list(range(end - start))
        for i in range(len(src) - 1):
            assert tgt[i] in (-100, src[i + 1])  # pre-shifted: target = next token
        if src[0] == tok.bos_id and tgt[-1] == tok.eos_id:  # a whole sample
            text = tok.decode(src[1:])
            if task == 1:
                assert text.startswith("问题") and "答" in text
                answer_start = next(i for i, t in enumerate(tgt) if t != -100)
                assert tok.decode(src[answer_start + 1 :]).startswith("答")
            else:
                assert all(t != -100 for t in tgt)  # pure LM: loss everywhere


def test_sft_wraps_prompt(mixture: list[dict], sp_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(sp_model)
    loader = _loader([mixture[1]], sp_model, tmp_path, sft=True, batch_size=1)
    batch = next(loader)
    r, start, end, _ = _segments(batch)[0]
    src = batch["input_ids"][r, start:end].tolist()
    assert src[1] == tok.encode("<用户>")[0]
    ai = tok.encode("<AI>")[0]
    cut = src.index(ai)
    tgt = batch["targets"][r, start:end].tolist()
    assert all(t == -100 for t in tgt[:cut]) and tgt[cut] != -100
    assert tok.decode(src[1:]).startswith("<用户>问题") and "<AI>答" in tok.decode(src[1:])


def test_make_windows_rules() -> None:
    out = list(range(10, 10 + 150))
    windows, _ = make_windows(1, 2, [], out, max_length=64, rule="segment")
    # 151 positions → 64 + 64 + 23
    assert [len(w[0]) for w in windows] == [64, 64, 23]
    joined_src = np.concatenate([w[0] for w in windows]).tolist()
    joined_tgt = np.concatenate([w[1] for w in windows]).tolist()
    assert joined_src == [1, *out] and joined_tgt == [*out, 2]
    windows, _ = make_windows(1, 2, [], list(range(10, 10 + 132)), max_length=64, rule="segment")
    assert [len(w[0]) for w in windows] == [64, 64]  # a 5-token tail window is dropped
    windows, _ = make_windows(1, 2, [5, 6], out, max_length=64, rule="segment")
    assert len(windows) == 1 and len(windows[0][0]) == 64 and windows[0][1][:2].tolist() == [-100, -100]
    assert make_windows(1, 2, [], out, max_length=64, rule="drop") == ([], "oversize_dropped")
    windows, _ = make_windows(1, 2, [], out, max_length=64, rule="head")
    assert len(windows) == 1 and windows[0][0].tolist() == [1, *out[:63]]
    assert make_windows(1, 2, list(range(62)), [7], max_length=64, rule="head")[1] == "input_too_long"
    windows, _ = make_windows(1, 2, list(range(100, 160)), [7, 8], max_length=64, rule="head", do_compact=True)
    src = windows[0][0].tolist()
    assert len(src) <= 64 and src[-2:] == [7, 8] and src[1] == 100 and 159 in src  # head and tail of the input kept


def test_no_repeat_each_line_once_across_ranks(tmp_path: Path, sp_model: Path) -> None:
    rows = [{"input": "", "output": f"行{i} " + t} for i, t in enumerate(corpus_lines(37))]
    entry = _task(tmp_path, "once", rows, allow_repeat=False)
    tok = load_tokenizer(sp_model)
    seen: list[list[str]] = []
    for rank in range(2):
        loader = _loader([entry], sp_model, tmp_path, rank=rank, world_size=2, max_length=256, batch_size=2)
        texts = []
        for batch in loader:
            for r, start, end, _ in _segments(batch):
                texts.append(tok.decode(batch["input_ids"][r, start:end].tolist()[1:]))
        with pytest.raises(StopIteration):
            next(loader)
        seen.append(texts)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["output"] for r in rows)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_exhausted_task_leaves_the_mix(tmp_path: Path, sp_model: Path) -> None:
    small = _task(tmp_path, "small", [{"output": f"s{i}"} for i in range(5)], allow_repeat=False, abs_weight=10.0)
    big = _task(tmp_path, "big", [{"output": t} for t in corpus_lines(30)], allow_repeat=True, abs_weight=1.0)
    loader = _loader([small, big], sp_model, tmp_path, batch_size=2)
    counts: Counter[int] = Counter()
    for _ in range(30):
        batch = next(loader)
        counts.update(task for *_, task in _segments(batch))
    assert counts[0] == 5  # each small line once, then only "big" is drawn
    assert loader.state_dict()["sampler"]["tasks"]["small"]["alive"] is False


def test_small_task_shared_by_ranks_when_repeating(tmp_path: Path, sp_model: Path) -> None:
    entry = _task(tmp_path, "tiny", [{"output": "only line"}])
    for rank in range(3):
        batch = next(_loader([entry], sp_model, tmp_path, rank=rank, world_size=3, batch_size=1))
        assert batch["num_tokens"] > 0
    entry["allow_repeat"] = False
    with pytest.raises(StopIteration):
        next(_loader([entry], sp_model, tmp_path, rank=2, world_size=3, batch_size=1))


def test_abs_weight_is_a_token_share(tmp_path: Path, sp_model: Path) -> None:
    short = _task(tmp_path, "short", [{"output": t[:8]} for t in corpus_lines(80, seed=3)], abs_weight=0.5)
    long_ = _task(tmp_path, "long", [{"output": t * 3} for t in corpus_lines(80, seed=4)], abs_weight=0.5)
    loader = _loader([short, long_], sp_model, tmp_path, batch_size=4, max_length=128)
    tokens = Counter()
    samples = Counter()
    for _ in range(150):
        batch = next(loader)
        for _r, start, end, task in _segments(batch):
            tokens[task] += end - start
            samples[task] += 1
    share = tokens[0] / (tokens[0] + tokens[1])
    assert 0.4 < share < 0.6  # equal token shares...
    assert samples[0] > 1.5 * samples[1]  # ...so the short task is drawn far more often


def test_epochs_reshuffle_and_cover(tmp_path: Path, sp_model: Path) -> None:
    rows = [{"output": f"第{i}行"} for i in range(10)]
    entry = _task(tmp_path, "rep", rows)
    tok = load_tokenizer(sp_model)
    loader = _loader([entry], sp_model, tmp_path, batch_size=1, max_length=16)
    texts = []
    for _ in range(30):
        batch = next(loader)
        texts += [tok.decode(batch["input_ids"][r, s:e].tolist()[1:]) for r, s, e, _ in _segments(batch)]
    epochs = [texts[i : i + 10] for i in (0, 10)]
    assert all(sorted(e) == sorted(r["output"] for r in rows) for e in epochs)
    assert epochs[0] != epochs[1]


def _run(loader: PackedLoader, n: int) -> list[dict[str, Any]]:
    return [next(loader) for _ in range(n)]


def test_resume_equals_uninterrupted_with_other_worker_count(
    mixture: list[dict], sp_model: Path, tmp_path: Path
) -> None:
    # a long document so that windows (pending lines) and row carry-overs are in the state
    mixture = mixture + [_task(tmp_path, "doc", [{"output": " ".join(corpus_lines(40))}], abs_weight=0.3)]
    reference = _loader(mixture, sp_model, tmp_path)
    expected = _run(reference, 12)
    first = _loader(mixture, sp_model, tmp_path, num_workers=2)
    _run(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON
    assert state == json.loads(
        json.dumps(_loader_state_after(mixture, sp_model, tmp_path, 5))
    )  # workers do not run ahead
    first.close()
    assert len(json.dumps(state)) < 4096
    for workers in (0, 2):
        resumed = _loader(mixture, sp_model, tmp_path, num_workers=workers)
        resumed.load_state_dict(state)
        got = _run(resumed, 7)
        resumed.close()
        assert all(_same(a, b) for a, b in zip(got, expected[5:]))


def _loader_state_after(mixture: list[dict], sp_model: Path, tmp_path: Path, n: int) -> dict[str, Any]:
    loader = _loader(mixture, sp_model, tmp_path)
    _run(loader, n)
    return loader.state_dict()


def test_workers_do_not_change_the_stream(mixture: list[dict], sp_model: Path, tmp_path: Path) -> None:
    a = _run(_loader(mixture, sp_model, tmp_path, num_workers=0), 6)
    with _loader(mixture, sp_model, tmp_path, num_workers=3, prefetch_factor=1) as loader:
        b = _run(loader, 6)
    assert all(_same(x, y) for x, y in zip(a, b))
    c = _run(_loader(mixture, sp_model, tmp_path, seed=99), 6)
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_resume_rejects_other_rank(mixture: list[dict], sp_model: Path, tmp_path: Path) -> None:
    loader = _loader(mixture, sp_model, tmp_path, world_size=2, rank=0)
    next(loader)
    other = _loader(mixture, sp_model, tmp_path, world_size=2, rank=1)
    with pytest.raises(DataError, match="rank=0 but this loader has 1"):
        other.load_state_dict(loader.state_dict())


def test_unindexed_path_is_rejected(tmp_path: Path, sp_model: Path) -> None:
    write_jsonl(tmp_path / "raw.jsonl", [{"output": "x"}])
    entry = {"dataset_name": "r", "task_name": "r", "path": "raw.jsonl"}
    with pytest.raises(DataError, match="not indexed yet"):
        _loader([entry], sp_model, tmp_path)


def test_cpm_tokenizer_works_too(mixture: list[dict], cpm_vocab: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(cpm_vocab)
    batch = next(_loader(mixture, cpm_vocab, tmp_path))
    r, start, end, _ = _segments(batch)[0]
    assert batch["input_ids"][r, start].item() == tok.bos_id and batch["num_tokens"] > 0
