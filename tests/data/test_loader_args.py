"""The guide's loader arguments act on the loader: reader threads per worker, read-ahead
depth; parallel_load_datastate is refused with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index
from fm9g.data.loader import PackedLoader
from fm9g.data.mixture import load_mixture
from fm9g.data.prefetch import CHUNK, READER_THREAD_PREFIX
from fm9g.data.tokenizer import load_tokenizer
from fm9g.rundir import config as cfg

from .conftest import corpus_lines, write_jsonl

# Records which process and thread made each line; the short sleep keeps a thread busy
# long enough that the pool's other threads take the chunk's next keys.
LOGGING_TRANSFORM = """
import os, threading, time
def transform(data, num_sample, r):
    time.sleep(0.02)
    with open({log!r}, "a") as handle:
        handle.write(f"{{os.getpid()}} {{threading.current_thread().name}}\\n")
    return data
"""


def _entry(tmp: Path, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    build_index(write_jsonl(tmp / "raw.jsonl", rows), tmp / "idx")
    entry = {"dataset_name": "d", "task_name": "t1", "path": str(tmp / "idx"), "allow_repeat": True}
    entry.update(extra)
    return entry


def _loader(entry: dict[str, Any], sp_model: Path, tmp: Path, **kw: Any) -> PackedLoader:
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_length", 64)
    return PackedLoader(load_mixture([entry], base_dir=tmp), load_tokenizer(sp_model), **kw)


@pytest.mark.parametrize("threads", [1, 3])
def test_dataloader_num_threads_is_the_reader_threads_of_each_worker(
    tmp_path: Path, sp_model: Path, threads: int
) -> None:
    log = tmp_path / "made_by.txt"
    (tmp_path / "t.py").write_text(LOGGING_TRANSFORM.format(log=str(log)))
    entry = _entry(tmp_path, [{"output": t} for t in corpus_lines(120)], transforms="t.py")
    with _loader(entry, sp_model, tmp_path, num_workers=2, num_threads=threads) as loader:
        batches = [next(loader) for _ in range(6)]
        assert loader._prefetch is not None
        worker_pids = {str(w.process.pid) for w in loader._prefetch._workers}
    by_pid: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        pid, name = line.split(" ", 1)
        by_pid.setdefault(pid, set()).add(name)
    assert set(by_pid) == worker_pids  # every line was made in a worker, none in this process
    for names in by_pid.values():
        if threads == 1:
            assert names == {"MainThread"}
        else:
            assert names == {f"{READER_THREAD_PREFIX}_{i}" for i in range(threads)}
    # threads change speed, never the stream
    reference = _loader(entry, sp_model, tmp_path, num_workers=0)
    assert all(batch["input_ids"].equal(next(reference)["input_ids"]) for batch in batches)


@pytest.mark.parametrize("prefetch", [1, 4])
def test_dataloader_prefetch_sets_the_read_ahead_depth(tmp_path: Path, sp_model: Path, prefetch: int) -> None:
    entry = _entry(tmp_path, [{"output": t} for t in corpus_lines(600)])
    with _loader(entry, sp_model, tmp_path, num_workers=1, prefetch=prefetch, prefetch_factor=1) as loader:
        assert loader.lookahead == prefetch * CHUNK
        held = []
        for _ in range(5):
            next(loader)
            held.append(loader.read_ahead()["t1"])
    # after each batch the workers hold between one chunk less than the depth and the depth
    assert all(prefetch * CHUNK - CHUNK < depth <= prefetch * CHUNK for depth in held), held


def test_read_ahead_depth_scales_with_workers_threads_and_factor(tmp_path: Path, sp_model: Path) -> None:
    entry = _entry(tmp_path, [{"output": t} for t in corpus_lines(50)])
    loader = _loader(entry, sp_model, tmp_path, num_workers=2, num_threads=3, prefetch=2, prefetch_factor=2)
    assert loader.lookahead == 2 * 2 * 2 * 3 * CHUNK
    loader.close()


def test_threads_without_workers_are_refused(tmp_path: Path, sp_model: Path) -> None:
    entry = _entry(tmp_path, [{"output": "x"}])
    with pytest.raises(DataError, match="needs num_workers >= 1"):
        _loader(entry, sp_model, tmp_path, num_workers=0, num_threads=2)
    with pytest.raises(cfg.ConfigError, match="dataloader_num_threads=2 needs data.dataloader_num_workers >= 1"):
        cfg.load(None, ["data.dataloader_num_threads=2", "data.dataloader_num_workers=0"])


def test_parallel_load_datastate_is_refused_with_the_reason() -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(None, ["data.parallel_load_datastate=8"])
    message = str(caught.value)
    assert "data.parallel_load_datastate" in message and "one small file per rank" in message
    assert "remove it" in message
    assert cfg.load(None)[0].data.parallel_load_datastate is None


def test_reader_threads_make_the_same_lines_as_one(tmp_path: Path, sp_model: Path) -> None:
    entry = _entry(tmp_path, [{"output": t} for t in corpus_lines(80)])
    streams = []
    for threads in (1, 4):
        with _loader(entry, sp_model, tmp_path, num_workers=1, num_threads=threads, batch_size=3) as loader:
            streams.append([next(loader) for _ in range(8)])
    assert all(a["input_ids"].equal(b["input_ids"]) and a["targets"].equal(b["targets"]) for a, b in zip(*streams))
