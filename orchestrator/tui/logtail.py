"""`LogFollower`: the new text of a growing log file, tick by tick, surviving
truncation (`> log`: the size shrinks) and rotation (`mv log log.1`: the inode changes)."""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class LogChunk:
    """One poll's text.  `reopened` says the file was truncated or replaced: `before`
    is what was left unread in the old file, `text` is read from the new one's start."""

    text: str
    reopened: bool = False
    before: str = ""
    missing: bool = False


class LogFollower:
    """Follows one file.  Not thread-safe: one poll at a time (the TUI's refresh worker)."""

    def __init__(self, path: Path, initial_bytes: int = 64 * 1024, max_read: int = 1024 * 1024) -> None:
        self.path = Path(path)
        self.initial_bytes = initial_bytes
        self.max_read = max_read
        self._handle: BinaryIO | None = None
        self._inode: tuple[int, int] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _read(self) -> str:
        assert self._handle is not None
        # The incremental decoder keeps a multi-byte character split across reads whole.
        return self._decoder.decode(self._handle.read(self.max_read))

    def _open(self) -> bool:
        first = self._inode is None
        try:
            handle = open(self.path, "rb")
        except OSError:
            return False
        self._handle = handle
        stat = os.fstat(handle.fileno())
        self._inode = (stat.st_dev, stat.st_ino)
        self._decoder.reset()
        if first and stat.st_size > self.initial_bytes:
            # A long log: show its tail only, from the next line boundary.
            handle.seek(stat.st_size - self.initial_bytes)
            handle.readline()
        return True

    def poll(self) -> LogChunk:
        """Read what was appended since the last poll."""
        try:
            stat = os.stat(self.path)
        except OSError:
            # Not there yet, or between a rotation's rename and the new file's creation.
            return LogChunk(self._read() if self._handle else "", missing=True)
        if self._handle is None:
            known = self._inode is not None
            if not self._open():
                return LogChunk("", missing=True)
            return LogChunk(self._read(), reopened=known)
        if (stat.st_dev, stat.st_ino) != self._inode:
            before = self._read()  # the rotated file's last lines, still readable by our handle
            self.close()
            if not self._open():
                return LogChunk(before, missing=True)
            return LogChunk(self._read(), reopened=True, before=before)
        if stat.st_size < self._handle.tell():
            self._handle.seek(0)
            self._decoder.reset()
            return LogChunk(self._read(), reopened=True)
        return LogChunk(self._read())
