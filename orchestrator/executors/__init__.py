"""Executors: the narrow interface (submit, poll many, cancel) and its two backends."""

from __future__ import annotations

from fm9g.orchestrator.executors.base import Executor, JobStatus

__all__ = ["Executor", "JobStatus", "make_executor"]


def make_executor(kind: str) -> Executor:
    if kind == "local":
        from fm9g.orchestrator.executors.local import LocalExecutor
        return LocalExecutor()
    if kind == "slurm":
        from fm9g.orchestrator.executors.slurm import SlurmExecutor
        return SlurmExecutor()
    raise ValueError(f"unknown executor {kind!r}: use local or slurm")
