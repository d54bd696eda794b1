"""Slurm job states as one enum, and the table that maps Slurm's spellings to it.

Slurm spells a state several ways: `squeue %T` prints `RUNNING`, `squeue %t` prints
`R`, `sacct` prints `CANCELLED by 0` (the uid that cancelled), and a column that is
too narrow ends in `+`.  `JobState.from_slurm` accepts every one of them.  A spelling
that is not in the table maps to `UNKNOWN`, never to a guess: the supervisor treats
UNKNOWN as "cannot tell", so it neither cancels nor resubmits anything.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class JobState(str, enum.Enum):
    """A job's state, named as Slurm names it in `squeue %T` and `sacct State`."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    DEADLINE = "DEADLINE"
    REQUEUED = "REQUEUED"
    SUSPENDED = "SUSPENDED"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    RESIZING = "RESIZING"
    UNKNOWN = "UNKNOWN"
    # Ours, not Slurm's: a job row recorded before sbatch was called (no job id yet).
    # No Slurm spelling maps to it.
    SUBMITTING = "SUBMITTING"

    @property
    def is_terminal(self) -> bool:
        """The job has ended and will not run again under this state."""
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """The job is queued, starting, running or still holding its nodes."""
        return self in _ACTIVE

    @classmethod
    def parse(cls, text: str) -> JobState:
        """A state as stored in state.db (a member's value); anything else is UNKNOWN."""
        try:
            return cls(text)
        except ValueError:
            return cls.UNKNOWN

    @classmethod
    def from_slurm(cls, text: str) -> JobState:
        """Map any of Slurm's spellings of a state (long, short, `by <uid>`, `+`) to a JobState."""
        name = text.strip()
        # sacct: "CANCELLED by 1234" names the uid that ran scancel.
        name = name.split(" by ", 1)[0]
        # A fixed-width sacct/squeue column truncates with a trailing "+".
        name = name.rstrip("+").upper()
        return SLURM_STATE_NAMES.get(name, cls.UNKNOWN)


# Slurm's own verdicts that the allocation, not the program, failed.
INFRASTRUCTURE_STATES = frozenset(
    {JobState.NODE_FAIL, JobState.BOOT_FAIL, JobState.PREEMPTED, JobState.TIMEOUT, JobState.DEADLINE, JobState.REVOKED}
)

# Ended: the exit code and the end time are final.  NODE_FAIL and PREEMPTED are
# terminal for this run of the job even though Slurm may requeue the same job id by
# itself (a requeueable batch job on a failed node comes back PENDING with
# Restarts+1); the caller sees that as the same id turning active again.
_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.BOOT_FAIL,
        JobState.PREEMPTED,
        JobState.OUT_OF_MEMORY,
        JobState.DEADLINE,
        JobState.REVOKED,
    }
)

TERMINAL_STATES = _TERMINAL

# In the queue or on nodes.  COMPLETING is active: the batch script has exited but
# the epilog and step cleanup still hold the node.  REQUEUED is the short window
# before a requeued job is PENDING again; SPECIAL_EXIT is a requeued job held by
# Slurm after a special exit code; both stay in the queue.
_ACTIVE = frozenset(
    {
        JobState.PENDING,
        JobState.CONFIGURING,
        JobState.RUNNING,
        JobState.COMPLETING,
        JobState.REQUEUED,
        JobState.SUSPENDED,
        JobState.SPECIAL_EXIT,
        JobState.RESIZING,
        JobState.SUBMITTING,
    }
)

# Every spelling Slurm 22.05 uses (src/common/slurm_protocol_defs.c,
# job_state_string and job_state_string_compact), to our enum.  The flag states
# with no enum member of their own map to the member whose handling they share.
SLURM_STATE_NAMES: Mapping[str, JobState] = MappingProxyType(
    {
        # long names (squeue %T, sacct State, scontrol JobState)
        "PENDING": JobState.PENDING,
        "CONFIGURING": JobState.CONFIGURING,
        "RUNNING": JobState.RUNNING,
        "COMPLETING": JobState.COMPLETING,
        "COMPLETED": JobState.COMPLETED,
        "FAILED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "TIMEOUT": JobState.TIMEOUT,
        "NODE_FAIL": JobState.NODE_FAIL,
        "BOOT_FAIL": JobState.BOOT_FAIL,
        "PREEMPTED": JobState.PREEMPTED,
        "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
        "DEADLINE": JobState.DEADLINE,
        "REQUEUED": JobState.REQUEUED,
        "SUSPENDED": JobState.SUSPENDED,
        "REVOKED": JobState.REVOKED,
        "SPECIAL_EXIT": JobState.SPECIAL_EXIT,
        "RESIZING": JobState.RESIZING,
        # flag states: held or waiting in the queue
        "REQUEUE_HOLD": JobState.PENDING,
        "REQUEUE_FED": JobState.REQUEUED,
        "RESV_DEL_HOLD": JobState.PENDING,
        "POWER_UP_NODE": JobState.CONFIGURING,
        # flag states: still on the nodes
        "SIGNALING": JobState.RUNNING,
        "STAGE_OUT": JobState.COMPLETING,
        "STOPPED": JobState.SUSPENDED,
        # squeue %t / scontrol compact names
        "PD": JobState.PENDING,
        "CF": JobState.CONFIGURING,
        "R": JobState.RUNNING,
        "CG": JobState.COMPLETING,
        "CD": JobState.COMPLETED,
        "F": JobState.FAILED,
        "CA": JobState.CANCELLED,
        "TO": JobState.TIMEOUT,
        "NF": JobState.NODE_FAIL,
        "BF": JobState.BOOT_FAIL,
        "PR": JobState.PREEMPTED,
        "OOM": JobState.OUT_OF_MEMORY,
        "DL": JobState.DEADLINE,
        "RQ": JobState.REQUEUED,
        "S": JobState.SUSPENDED,
        "RV": JobState.REVOKED,
        "SE": JobState.SPECIAL_EXIT,
        "RS": JobState.RESIZING,
        "RH": JobState.PENDING,
        "RF": JobState.REQUEUED,
        "RD": JobState.PENDING,
        "PU": JobState.CONFIGURING,
        "SI": JobState.RUNNING,
        "SO": JobState.COMPLETING,
        "ST": JobState.SUSPENDED,
        # sacct writes COMPLETED; slurmctld's own logs and some plugins say COMPLETE
        "COMPLETE": JobState.COMPLETED,
        "UNKNOWN": JobState.UNKNOWN,
    }
)
