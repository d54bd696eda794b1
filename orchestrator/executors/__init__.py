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
    if kind == "auto":
        from fm9g.rundir.config import ConfigError

        # `auto` is made concrete when a run is launched (executors.choose), and config.yaml
        # keeps the result: jobs are polled and cancelled where they were started.
        raise ConfigError(
            "executor: auto was not resolved to local or slurm before jobs were submitted or polled; "
            "a run's config.yaml names the executor its jobs use: set `executor: local` or "
            "`executor: slurm` there"
        )
    raise ValueError(f"unknown executor {kind!r}: use local or slurm")
