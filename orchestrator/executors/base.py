"""The executor interface every backend fills in: submit a rendered script, poll many
jobs in one call, cancel, and adopt a job another process submitted.  A poll that
cannot tell says UNKNOWN, never FAILED; a poll that cannot run at all raises PollError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from fm9g.orchestrator.slurm.states import JobState

ExecutorKind = Literal["local", "slurm"]


class PollError(RuntimeError):
    """A poll failed as a whole (slurmctld down, a timeout): nothing is concluded from it."""


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    exit_code: int | None = None
    node: str = ""
    reason: str = ""
    restarts: int = 0  # Slurm's own requeue count (same job id)
    started_at: float | None = None
    ended_at: float | None = None
    held: str = ""  # every node the job holds (a Slurm hostlist); `node` is its batch host


UNKNOWN = JobStatus(JobState.UNKNOWN)


class Executor(Protocol):
    name: ExecutorKind

    def submit(
        self,
        script: Path,
        *,
        log: Path,
        tag: str,
        env: dict[str, str] | None = None,
        after: Sequence[str] = (),
        array: int | None = None,
    ) -> str:
        """Start `script` as one job with stdout+stderr appended to `log`; returns its id.

        `after`: job ids that must all complete successfully first (afterok; the job is
        cancelled when one fails).  `array`: run it as that many tasks, each with its
        SLURM_ARRAY_TASK_ID."""
        ...

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of many jobs in one call; a job that cannot be seen maps to UNKNOWN.
        Raises PollError when the poll itself failed."""
        ...

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Ask each job to stop (SIGTERM to its batch step, as scancel does)."""
        ...

    def cancel_node(self, job_id: str, step: str) -> None:
        """Stop one node of a multi-node allocation (cluster.start: together): its step."""
        ...

    def release_node(self, job_id: str, node: str) -> bool:
        """Give a node of a multi-node allocation back to the cluster, the rest running on;
        False when the job no longer holds it."""
        ...

    def adopt(self, job_id: str, log: Path) -> None:
        """Let this process poll and cancel a job that another fm9g-launch process submitted."""
        ...

    def usable_nodes(self) -> set[str] | None:
        """Names of the nodes jobs can land on now, or None where there is no such notion."""
        ...

    def job_env(self, jobs_at_once: int) -> dict[str, str]:
        """Extra environment for each of `jobs_at_once` jobs that share this executor's machine."""
        ...

    def tick_interval(self, configured: float) -> float:
        """Seconds between polls, given supervise.poll_interval."""
        ...
