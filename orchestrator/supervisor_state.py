"""Where a run's supervisor job stands (supervise.where: job), as a viewer can tell
without asking Slurm: from the supervisor's own events in state.db, and whether some
supervisor holds the run's lock right now.

The events (written by `supervisor_job`): `supervisor_job` with why=start when a job
starts, with any other why when one is submitted (the launch, a hand-over); a
`supervisor_handover` names the successor; `supervisor_end` when a job ends cleanly.
A job killed by scancel or a node failure writes nothing: it shows as started while
nobody holds the lock, until its guard job starts and says so.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from fm9g.orchestrator.state import EventRow

__all__ = ["SupervisorJob", "SupervisorPhase", "follow", "with_lock"]

# Event kinds of orchestrator/supervisor_job.py (EVENT_SUBMITTED, EVENT_HANDOVER,
# EVENT_END); spelled here so a viewer need not import the launch code (a test pins them).
EVENT_SUBMITTED = "supervisor_job"
EVENT_HANDOVER = "supervisor_handover"
EVENT_END = "supervisor_end"
WHY_START = "start"


class SupervisorPhase(str, enum.Enum):
    """What the newest supervisor job is doing."""

    QUEUED = "queued"  # submitted, not started yet
    RUNNING = "running"  # started, and a supervisor holds the run's lock
    LOST = "lost"  # started, never said it ended, and nobody holds the lock: killed or crashed
    ENDED = "ended"  # ended cleanly (the run is over, or it was cancelled)


@dataclass(frozen=True)
class SupervisorJob:
    job_id: str
    phase: SupervisorPhase


def follow(events: Iterable[EventRow], current: SupervisorJob | None) -> SupervisorJob | None:
    """The newest supervisor job after `events` (oldest first), starting from `current`."""
    for event in events:
        if event.kind == EVENT_SUBMITTED and event.data.get("job_id"):
            started = event.data.get("why") == WHY_START
            phase = SupervisorPhase.RUNNING if started else SupervisorPhase.QUEUED
            current = SupervisorJob(str(event.data["job_id"]), phase)
        elif event.kind == EVENT_HANDOVER and event.data.get("successor"):
            current = SupervisorJob(str(event.data["successor"]), SupervisorPhase.QUEUED)
        elif event.kind == EVENT_END and current is not None:
            current = replace(current, phase=SupervisorPhase.ENDED)
    return current


def with_lock(job: SupervisorJob, holds_lock: bool) -> SupervisorJob:
    """A started job is RUNNING only while some supervisor holds the run's lock."""
    if job.phase is SupervisorPhase.RUNNING and not holds_lock:
        return replace(job, phase=SupervisorPhase.LOST)
    return job
