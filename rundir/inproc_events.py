"""Membership events of in-process recovery (supervise.on_node_loss wait/shrink), as files.

Each trainer process and node agent appends JSON lines to its own
`events/inproc/<uid>.jsonl`, one `os.write` per line (O_APPEND), so a killed process leaves
at most a torn last line, which `read_events` skips.  The supervisor imports the lines
into state.db (as `inproc` events); nothing on a compute node touches SQLite.

A line: {"event": name, "t": unix time, "uid": the writer, "node_rank": k, ...fields}.
Trainer events: arrived, spare, formed, synced, detected, gone, first_step, start_failed,
recovery_failed, batch (the effective batch when it changes).  Agent events: rank_exit,
rank_restart, fallback, killed_lost.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def trainer_uid(node_rank: object, local_rank: object, pid: object) -> str:
    """The uid a trainer process writes its events and joins its groups under."""
    return f"n{node_rank}r{local_rank}p{pid}"


def parse_trainer_uid(uid: str) -> tuple[int, int, int] | None:
    """(node rank, local rank, pid) of a trainer uid 'n<k>r<l>p<pid>', else None."""
    if not uid.startswith("n") or "r" not in uid or "p" not in uid:
        return None
    try:
        node, rest = uid[1:].split("r", 1)
        local, pid = rest.split("p", 1)
        return int(node), int(local), int(pid)
    except ValueError:
        return None


class EventWriter:
    """Appends one process's events; safe to call from several threads."""

    def __init__(self, folder: Path, uid: str, **common: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{uid}.jsonl"
        self.common = {"uid": uid, **common}
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, event: str, fields: dict[str, Any] | None = None) -> None:
        record = {"event": event, "t": time.time(), **self.common, **(fields or {})}
        try:
            os.write(self.fd, (json.dumps(record, default=str) + "\n").encode())
        except OSError:
            pass  # an event is worth less than the training step that emits it

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of `path` from byte `offset`, and the offset after the last one
    (a torn last line is left for the next read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            records.append(record)
    return records, offset + end
