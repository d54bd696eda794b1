"""Hidden temporary folders of an index build: named so a later run can tell they are stale.

An index build works in hidden folders next to its output (`.<output>.work-…` for the
shard results, `.<output>.tmp-…` for the output under construction, `.<output>.old-…`
for the index being replaced). A build killed with SIGKILL (or a lost node) cannot
remove them, and each can hold as much as the output itself. Every such folder is
named `.<stem>.<kind>-<host>-<pid>-<random>`, so the next build into the same place
removes the ones whose process is gone: same host, and that pid no longer alive.
Folders of another host (a shared filesystem) or of a live pid are never touched;
a reused pid only makes the sweep skip a folder, never remove one in use.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from fm9g.rundir.atomic import default_dir_mode

TempKind = Literal["work", "tmp", "old"]
_KINDS = get_args(TempKind)


def _host() -> str:
    """This host's name reduced to characters that cannot clash with the name's separators."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def temp_prefix(stem: str, kind: TempKind) -> str:
    """The name prefix this process gives a `kind` folder for `stem` (random part follows)."""
    return f".{stem}.{kind}-{_host()}-{os.getpid()}-"


def make_temp_dir(parent: Path, stem: str, kind: TempKind, shared: bool = False) -> Path:
    """mkdtemp in `parent` under a sweepable name; `shared` gives it the usual 0o777 & ~umask.

    mkdtemp creates 0700 folders; a folder that becomes the index output must have the
    mode `mkdir` would give, or the group cannot read the data it was built for."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(stem, kind), dir=parent))
    if shared:
        os.chmod(path, default_dir_mode())
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@dataclass(frozen=True)
class Swept:
    """A stale folder that was removed, and how many bytes it held."""

    path: Path
    nbytes: int


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def sweep_stale(parent: Path, stem: str | None = None) -> list[Swept]:
    """Remove this host's temporary folders for `stem` (any stem: None) whose process died."""
    name = re.escape(stem) if stem is not None else r".+"
    pattern = re.compile(rf"\.{name}\.({'|'.join(_KINDS)})-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
    host, me = _host(), os.getpid()
    swept: list[Swept] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return swept
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != host or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid == me or _pid_alive(pid):
            continue
        path = Path(entry.path)
        nbytes = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            swept.append(Swept(path, nbytes))
    return swept


def remove_own(parent: Path, stem: str) -> None:
    """Remove this process's `work` and `tmp` folders for `stem` (after a failed build).

    The clean-up by name, not by variable: an interrupt (Ctrl-C, SIGTERM) can land
    between mkdtemp and the assignment of its result, leaving a folder no variable
    names. `old` folders are left alone: one may be the only copy of the previous index
    while install_dir puts it back."""
    for kind in ("work", "tmp"):
        for path in parent.glob(f"{glob.escape(temp_prefix(stem, kind))}*"):  # type: ignore[arg-type]
            shutil.rmtree(path, ignore_errors=True)
