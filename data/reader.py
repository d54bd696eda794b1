"""Random access to the lines of an index directory: `IndexedDataset`.

data.jsonl is memory-mapped once and the line bounds are one int64 numpy array, so a
read is two array lookups and a slice: no seek, no file reopen per line (the original
reopened the file for every read). Bounds come from index.h5 when present (mapped in
place when its layout allows, else read), otherwise from the text `index`, parsed once.

Two bound conventions exist (reference §1.2): the builder's N+1 bounds starting at 0,
and convert_json2index.py's N end offsets without the leading 0. The latter is
detected by its first value not being 0 and fixed by prepending 0, so its first line
is not silently dropped as the original reader did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, overload

import h5py
import numpy as np

from fm9g.data.errors import DataError
from fm9g.data.index_check import decode_json


def _map_h5(h5_path: Path) -> np.ndarray | None:
    """The HDF5 `index` dataset memory-mapped in place, when its layout allows it.

    A contiguous, uncompressed int64 dataset (what h5py writes by default, here and
    in the original tools) is a plain array at a fixed file offset; mapping it costs
    no memory per process, which matters for 100M-line datasets read by many workers.
    """
    with h5py.File(h5_path, "r") as h5:
        dataset = h5["index"]
        offset = dataset.id.get_offset()
        simple = dataset.chunks is None and dataset.compression is None and dataset.ndim == 1
        if offset is None or not simple or dataset.dtype != np.dtype("<i8") or dataset.shape[0] == 0:
            return None
        count = dataset.shape[0]
    return np.memmap(h5_path, dtype="<i8", mode="r", offset=offset, shape=(count,)).view(np.ndarray)


def load_bounds(path: str | Path) -> np.ndarray:
    """The N+1 line bounds of an index directory (legacy end offsets get a leading 0)."""
    directory = Path(path)
    h5_path, text_path = directory / "index.h5", directory / "index"
    if h5_path.is_file():
        try:
            bounds = _map_h5(h5_path)
            if bounds is None:
                with h5py.File(h5_path, "r") as h5:
                    bounds = np.asarray(h5["index"][:], dtype=np.int64)
        except (OSError, KeyError) as error:
            raise DataError(f"{h5_path}: unreadable index ({error}); rebuild the index") from None
    elif text_path.is_file():
        try:
            bounds = np.array(text_path.read_bytes().split(), dtype=np.int64)
        except ValueError:
            raise DataError(f"{text_path}: not a list of integers; rebuild the index") from None
    else:
        raise DataError(f"{directory}: no index.h5 or index file; build it with build_index first")
    bounds = bounds.reshape(-1)
    if bounds.size == 0 or bounds[0] != 0:
        bounds = np.concatenate([np.zeros(1, dtype=np.int64), bounds])  # legacy: end offsets
    return bounds


class IndexedDataset:
    """The lines of an index directory as raw bytes, with O(1) random access."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.bounds = load_bounds(self.path)
        data_path = self.path / "data.jsonl"
        if not data_path.is_file():
            raise DataError(f"{self.path}: data.jsonl is missing; rebuild the index")
        size = data_path.stat().st_size
        if int(self.bounds[-1]) != size:
            raise DataError(
                f"{self.path}: the index ends at byte {int(self.bounds[-1])} but data.jsonl has {size} bytes; "
                "the index does not belong to this data, rebuild it"
            )
        self._data: np.ndarray | None = None

    def _map(self) -> np.ndarray:
        # Mapped on first use, so a pickled dataset (loader workers) maps in its own process.
        if self._data is None:
            if int(self.bounds[-1]) == 0:
                self._data = np.zeros(0, dtype=np.uint8)
            else:
                mapped = np.memmap(self.path / "data.jsonl", dtype=np.uint8, mode="r")
                # A plain ndarray view: slicing a memmap subclass costs extra per read.
                self._data = mapped.view(np.ndarray)
        return self._data

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _line(self, index: int) -> bytes:
        return self._map()[self.bounds[index] : self.bounds[index + 1]].tobytes()

    @overload
    def __getitem__(self, key: int) -> bytes: ...

    @overload
    def __getitem__(self, key: slice) -> list[bytes]: ...

    def __getitem__(self, key: int | slice) -> bytes | list[bytes]:
        """Line `key` as bytes (with its newline); a slice gives a list."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                if stop <= start:
                    return []
                # one read for the whole run, then split at the bounds
                base = int(self.bounds[start])
                block = self._map()[base : self.bounds[stop]].tobytes()
                edges = (self.bounds[start : stop + 1] - base).tolist()
                return [block[a:b] for a, b in zip(edges, edges[1:])]
            return [self._line(i) for i in range(start, stop, step)]
        index = int(key)
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"line {key} out of range for {size} lines")
        return self._line(index)

    def __iter__(self) -> Iterator[bytes]:
        for index in range(len(self)):
            yield self._line(index)

    def get_json(self, index: int) -> Any:
        """Line `index` decoded from JSON."""
        raw = self[index]
        try:
            return decode_json(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(
                f"{self.path}/data.jsonl:{index + 1 if index >= 0 else len(self) + index + 1}: not valid JSON ({error})"
            ) from None

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle the mappings (numpy would copy whole files into the pickle);
        # the receiving process maps them itself.
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


__all__ = ["IndexedDataset", "load_bounds"]
