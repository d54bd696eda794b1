"""Failure taxonomy: which class a dead node job belongs to, and so which retry budget
pays for it.  Pure: a job's final state, exit code and log tail in, a class out."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fm9g.orchestrator.slurm.states import INFRASTRUCTURE_STATES, JobState
from fm9g.rundir import protocol


class FailureClass(str, Enum):
    INFRA = "infrastructure"  # NODE_FAIL, BOOT_FAIL, PREEMPTED, TIMEOUT, node lost
    APP = "application"  # non-zero exit, communication errors
    FATAL = "do-not-retry"  # config error, user cancel, reserved exit code
    CONTINUE = "continue"  # checkpointed on request: resubmit without spending a budget


# Communication errors in a log mean a peer died, not that this node is broken.
COMM_ERROR = re.compile(
    r"(gloo|nccl|NCCL|Connection (closed|reset) by peer|RendezvousConnectionError|DistNetworkError)"
)


@dataclass(frozen=True)
class Failure:
    klass: FailureClass
    reason: str


def classify(
    state: JobState,
    exit_code: int | None,
    log_tail: str = "",
    cancelled_by_user: bool = False,
    fatal_reason: str | None = None,
    run_name: str = "RUN",
) -> Failure:
    """Classify one ended node job that did not complete the run; `fatal_reason` is what the
    trainer wrote to control/fatal.json, if anything; `run_name` fills in the resume command."""
    state = JobState.parse(state)
    if exit_code == protocol.EXIT_CONTINUE:
        return Failure(FailureClass.CONTINUE, "checkpointed on a walltime/preemption signal")
    if exit_code == protocol.EXIT_NO_SPACE:
        # Retrying would only fill the disk again: stop, and say how to go on once there is room.
        detail = f" ({fatal_reason})" if fatal_reason else ""
        return Failure(
            FailureClass.FATAL,
            f"the disk is full{detail}; free space, then `fm9g-launch resume "
            f"{run_name}` continues from the last complete checkpoint",
        )
    if exit_code == protocol.EXIT_CONFIG:
        what = fatal_reason or "no reason recorded in control/fatal.json"
        return Failure(FailureClass.FATAL, f"the trainer reported a config or data error: {what}")
    if state is JobState.CANCELLED and cancelled_by_user:
        return Failure(FailureClass.FATAL, "cancelled by the user")
    if state in INFRASTRUCTURE_STATES:
        return Failure(FailureClass.INFRA, f"Slurm ended the job with {state.value}")
    if state is JobState.CANCELLED:
        # Cancelled by someone other than this run's user action: an admin, or a node lost.
        return Failure(FailureClass.INFRA, "the job was cancelled outside fm9g-launch")
    if state is JobState.OUT_OF_MEMORY:
        return Failure(FailureClass.APP, "out of memory")
    if exit_code == protocol.EXIT_ENDPOINT_TIMEOUT:
        return Failure(FailureClass.APP, "the worker never saw the master's endpoint")
    if COMM_ERROR.search(log_tail):
        return Failure(FailureClass.APP, f"exit code {exit_code}: a communication error (a peer died)")
    return Failure(FailureClass.APP, f"exit code {exit_code}")
