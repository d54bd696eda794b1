"""Executors: the narrow interface (submit, poll many, cancel) and its two backends."""

from __future__ import annotations

from fm9g.orchestrator.executors.base import Executor, JobStatus

__all__ = ["Executor", "JobStatus", "make_executor"]


def make_executor(kind: str, since: float | None = None) -> Executor:
    """The executor named `kind`; `since` (epoch seconds) bounds Slurm accounting queries."""
    if kind == "local":
        from fm9g.orchestrator.executors.local import LocalExecutor

        return LocalExecutor()
    if kind == "slurm":
        from datetime import datetime, timedelta

        from fm9g.orchestrator.executors.slurm import SlurmExecutor

        start = datetime.fromtimestamp(since) - timedelta(minutes=10) if since else None
        return SlurmExecutor(since=start)
    raise ValueError(f"unknown executor {kind!r}: use local or slurm")
