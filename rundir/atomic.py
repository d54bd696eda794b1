"""The one atomic-write helper: every file another process reads goes through here.

A reader never sees a half-written file: the bytes go to a temporary name in the same
directory (so the rename stays on one filesystem), are flushed and fsynced, and the
temporary file is renamed over the final path in one step.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; `mode` sets the permission bits before the rename.

    durable=False skips the fsync: still never half-visible, but may be lost in a power
    cut (right for heartbeats, rewritten every step)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return final


def write_text(path: str | os.PathLike[str], text: str, mode: int | None = None, durable: bool = True) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"), mode=mode, durable=durable)


def write_json(path: str | os.PathLike[str], obj: Any, mode: int | None = None, indent: int | None = 2,
               durable: bool = True) -> Path:
    """Serialise `obj` as JSON (UTF-8, not ASCII-escaped) and write it atomically."""
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", mode=mode, durable=durable)


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """Read a JSON file written by `write_json`; None when it does not exist (yet)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def replace_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> Path:
    """Move a fully built `tmp_dir` into place as `final_dir` (which must not exist)."""
    final = Path(final_dir)
    os.replace(tmp_dir, final)
    return final


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary handle whose content replaces `path` atomically on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and non-Linux platforms) refuse fsync on directories
    finally:
        os.close(fd)
