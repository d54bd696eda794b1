"""IndexedDataset: random access, both bound conventions, compatibility with the original layout."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from fm9g.data.errors import DataError
from fm9g.data.indexer import build_index
from fm9g.data.reader import IndexedDataset

from .conftest import corpus_lines, write_jsonl


class OriginalLayoutReader:
    """Reads an index the way the original IndexedDataset does (reference §1.2-1.3).

    The text `index` is a list of bounds: line k is bytes [bounds[k], bounds[k+1]) of
    data.jsonl, read by seeking in a freshly opened file; len = len(bounds) - 1.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bounds = [int(x) for x in (path / "index").read_text().split("\n") if x.strip()]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k: int) -> bytes:
        with open(self.path / "data.jsonl", "rb", buffering=0) as handle:
            handle.seek(self.bounds[k])
            return handle.read(self.bounds[k + 1] - self.bounds[k])


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, list[bytes]]:
    rows = [{"input": "", "output": text} for text in corpus_lines(120)]
    rows.append({"input": "问\r题", "output": "answer with \r inside"})
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    build_index(src, tmp_path / "idx")
    return tmp_path / "idx", [line + b"\n" for line in src.read_bytes().split(b"\n")[:-1]]


def test_random_access_and_slices(built: tuple[Path, list[bytes]]) -> None:
    path, lines = built
    ds = IndexedDataset(path)
    assert len(ds) == len(lines)
    assert ds[0] == lines[0] and ds[57] == lines[57]
    assert ds[-1] == lines[-1] and ds[-len(lines)] == lines[0]
    assert ds[10:20] == lines[10:20] and ds[5:50:7] == lines[5:50:7] and ds[30:10] == []
    assert ds[-3:] == lines[-3:]
    assert list(ds) == lines
    assert ds.get_json(-1) == {"input": "问\r题", "output": "answer with \r inside"}
    with pytest.raises(IndexError):
        ds[len(lines)]
    with pytest.raises(IndexError):
        ds[-len(lines) - 1]


def test_built_index_reads_with_original_layout_rules(built: tuple[Path, list[bytes]]) -> None:
    path, lines = built
    original = OriginalLayoutReader(path)
    assert len(original) == len(lines)
    assert [original[k] for k in range(len(original))] == lines
    with h5py.File(path / "index.h5", "r") as h5:
        assert h5["index"].dtype == np.int64 and list(h5["index"][:]) == original.bounds


@pytest.mark.parametrize("with_h5", [True, False])
def test_legacy_end_offsets_are_read_in_full(tmp_path: Path, with_h5: bool) -> None:
    # what convert_json2index.py writes: N end offsets, no leading 0
    lines = [json.dumps({"input": "", "output": t}, ensure_ascii=False).encode() + b"\n" for t in corpus_lines(9)]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "data.jsonl").write_bytes(b"".join(lines))
    ends = np.cumsum([len(line) for line in lines]).tolist()
    (legacy / "index").write_text("\n".join(map(str, ends)) + "\n")
    if with_h5:
        with h5py.File(legacy / "index.h5", "w") as h5:
            h5.create_dataset("index", data=ends)
    ds = IndexedDataset(legacy)
    assert len(ds) == 9
    assert [ds[k] for k in range(9)] == lines  # the first line is not dropped


def test_h5_bounds_are_mapped_not_copied(built: tuple[Path, list[bytes]]) -> None:
    path, lines = built
    ds = IndexedDataset(path)
    assert not ds.bounds.flags.owndata and not ds.bounds.flags.writeable  # a view of the mapped file
    assert ds[len(lines) - 1] == lines[-1]


def test_text_index_only(built: tuple[Path, list[bytes]]) -> None:
    path, lines = built
    (path / "index.h5").unlink()
    assert IndexedDataset(path)[3] == lines[3]


def test_mismatched_or_missing_index_is_a_data_error(built: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    path, _ = built
    with open(path / "data.jsonl", "ab") as handle:
        handle.write(b'{"output": "appended later"}\n')
    with pytest.raises(DataError, match="does not belong to this data"):
        IndexedDataset(path)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="build it with build_index"):
        IndexedDataset(tmp_path / "bare")


def test_pickle_does_not_carry_the_data(built: tuple[Path, list[bytes]]) -> None:
    path, lines = built
    ds = IndexedDataset(path)
    assert ds[0] == lines[0]  # mapped now
    blob = pickle.dumps(ds)
    assert len(blob) < (path / "data.jsonl").stat().st_size
    clone = pickle.loads(blob)
    assert clone[7] == lines[7] and len(clone) == len(ds)
