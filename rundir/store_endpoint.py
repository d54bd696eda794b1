"""The store job's endpoint file (supervise.on_node_loss wait/shrink): where the run's
TCPStore listens.  Every trainer rank forms its process groups through that store, so it
lives in a 1-CPU job of its own that no training node's loss can take down.  `serial`
grows by one each time a store job starts: a rank that saw store N fail waits for N + 1.
Written atomically by the store job; read by node agents and trainers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fm9g.rundir.atomic import write_json


@dataclass(frozen=True)
class StoreEndpoint:
    host: str
    port: int
    serial: int
    job_id: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def session_namespace(run_name: str, session: int | str) -> str:
    """The key prefix of one session's ranks in the store: the run, and the session number
    the supervisor gives every node job of one (re)start (so a continue never meets an
    earlier session's groups).  The trainers and the node agents both use it."""
    from fm9g.rundir.protocol import slug

    return f"{slug(run_name)}-s{int(session)}"


def read_store_endpoint(path: Path) -> StoreEndpoint | None:
    """The published store, or None when there is none (or the file is unreadable)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return StoreEndpoint(
            host=str(raw["host"]), port=int(raw["port"]), serial=int(raw["serial"]), job_id=str(raw["job_id"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_store_endpoint(path: Path, endpoint: StoreEndpoint) -> None:
    write_json(path, asdict(endpoint))
