"""The one atomic-write helper: every file another process reads goes through here.

A reader never sees a half-written file: the bytes go to a temporary name in the same
directory (so the rename stays on one filesystem), are flushed and fsynced, and the
temporary file is renamed over the final path in one step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc: thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the portable way sets it; put it straight back
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 & ~umask: what open() would have given (mkstemp always gives 0600)."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """0o777 & ~umask: what mkdir would have given (mkdtemp always gives 0700)."""
    return 0o777 & ~current_umask()


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None, durable: bool = True) -> Path:
    """Write `data` to `path` atomically; `mode` sets the permission bits before the rename.

    Without `mode` the file gets the usual 0o666 & ~umask, not mkstemp's owner-only 0600:
    index outputs and run files are shared with a group (secrets pass mode=0o600).

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
        os.chmod(tmp, default_file_mode() if mode is None else mode)
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


def write_json(
    path: str | os.PathLike[str], obj: Any, mode: int | None = None, indent: int | None = 2, durable: bool = True
) -> Path:
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
def atomic_output(path: str | os.PathLike[str], durable: bool = True, mode: int | None = None) -> Iterator[BinaryIO]:
    """Yield a binary handle whose content replaces `path` atomically on success (mode as `write_bytes`)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.chmod(tmp, default_file_mode() if mode is None else mode)
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


# ENOSPC: the filesystem is full; EDQUOT: the user's quota on it is. Both mean "free space".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(error: BaseException) -> bool:
    """True for an OSError that means the disk (or the quota on it) is full."""
    return isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"


def mount_point(path: str | os.PathLike[str]) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def describe_no_space(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(mount point, "the filesystem mounted at M is full (F free of T) while writing P")."""
    mount = mount_point(path)
    try:
        usage = shutil.disk_usage(mount)
        space = f"{_human(usage.free)} free of {_human(usage.total)}"
    except OSError:
        space = "free space unknown"
    return mount, f"the filesystem mounted at {mount} is full ({space}) while writing {path}"


def no_space_reason(path: str | os.PathLike[str], then: str) -> str:
    """ "the filesystem mounted at M is full (...) while writing P; free space on M, then <then>"."""
    mount, what = describe_no_space(path)
    return f"{what}; free space on {mount}, then {then}"
