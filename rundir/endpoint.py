"""The rendezvous endpoint file: where the master's c10d store listens, and which
generation of the run it serves.  Written atomically; read by every worker agent."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fm9g.rundir.atomic import write_json


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    generation: int
    job_id: str
    rdzv_id: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def read_endpoint(path: Path) -> Endpoint | None:
    """The published endpoint, or None when there is none (or it is being replaced)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Endpoint(
            host=str(raw["host"]),
            port=int(raw["port"]),
            generation=int(raw["generation"]),
            job_id=str(raw["job_id"]),
            rdzv_id=str(raw["rdzv_id"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_endpoint(path: Path, endpoint: Endpoint) -> None:
    write_json(path, asdict(endpoint))


def next_generation(requested: int, current: Endpoint | None) -> int:
    """The generation a (re)starting master publishes.

    A job that Slurm requeues by itself keeps its original environment, so it would
    publish an old generation that waiting workers ignore; taking the file's
    generation + 1 makes every new master newer than the last one.
    """
    if current is None:
        return requested
    return max(requested, current.generation + 1)
