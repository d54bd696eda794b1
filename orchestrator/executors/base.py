"""The executor interface every backend fills in: submit a rendered script, poll many
jobs in one call, cancel.  A poll that cannot tell returns UNKNOWN, never FAILED."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class JobStatus:
    state: str                 # a JobState name (PENDING, RUNNING, COMPLETED, FAILED, ..., UNKNOWN)
    exit_code: int | None = None
    node: str = ""
    reason: str = ""
    restarts: int = 0          # Slurm's own requeue count (same job id)
    started_at: float | None = None
    ended_at: float | None = None


class Executor(Protocol):
    name: str

    def submit(self, script: Path, *, log: Path, tag: str, env: dict[str, str] | None = None) -> str:
        """Start `script` as one job with stdout+stderr appended to `log`; returns its id."""
        ...

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """States of many jobs in one call; jobs that cannot be seen map to UNKNOWN."""
        ...

    def cancel(self, job_ids: list[str]) -> None:
        ...
