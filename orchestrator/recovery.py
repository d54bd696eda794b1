"""The timeline of each repair: detected -> resubmitted -> allocated -> rendezvous -> first step.

Time-to-recover is a product figure (DESIGN, Supervision), so every repair the train
policy makes opens a `Recovery`, and each tick fills in its later phases from the
replacement's job row (allocated) and the nodes' heartbeat files (rendezvous: a trainer
process started after the failure; first step: one of them stepped past where it
started).  When the last phase is known, one `recovery` event carries them all.

Heartbeats are the files `model.metrics.write_heartbeat` writes: `step`, `time`,
`started` (when the trainer passed the rendezvous) and `start_step`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fm9g.orchestrator.state import JobRow, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import read_json


class RecoveryPhase(str, enum.Enum):
    """The phases of one repair, in the order they happen; a value names a `Recovery` field."""

    DETECTED = "detected"  # the failed job's end
    RESUBMITTED = "resubmitted"  # the replacement was submitted
    ALLOCATED = "allocated"  # the replacement's job started running
    RENDEZVOUS = "rendezvous"  # a trainer process started after the failure (passed the rendezvous)
    FIRST_STEP = "first_step"  # such a trainer took a step past its start


@dataclass(frozen=True)
class Heartbeat:
    """One node's heartbeat file, as the trainer last wrote it."""

    node_rank: int
    step: int
    time: float
    started: float
    start_step: int
    first_step_at: float | None = None  # when this trainer finished its first step (older files: None)

    @classmethod
    def parse(cls, node_rank: int, record: object) -> Heartbeat | None:
        """A heartbeat from its JSON object; None for a missing or malformed file."""
        if not isinstance(record, dict):
            return None
        try:
            return cls(
                node_rank=node_rank,
                step=int(record.get("step", -1)),
                time=float(record.get("time", 0.0)),
                started=float(record.get("started", 0.0)),
                start_step=int(record.get("start_step", -1)),
                first_step_at=float(record["first_step_at"]) if record.get("first_step_at") is not None else None,
            )
        except (TypeError, ValueError):
            return None

    @property
    def stepped(self) -> bool:
        """This trainer process took at least one step since it started."""
        return self.step > self.start_step


def read_heartbeats(run: RunDir, nodes: int) -> list[Heartbeat]:
    """The heartbeats of nodes 0..nodes-1 that have one."""
    beats = []
    for rank in range(nodes):
        beat = Heartbeat.parse(rank, read_json(run.heartbeat(rank)))
        if beat is not None:
            beats.append(beat)
    return beats


@dataclass
class Recovery:
    """One repair of one node and the time each of its phases was reached (epoch seconds)."""

    id: int
    node_rank: int
    new_job_row: int  # the replacement's job row
    step_at_failure: int  # the highest heartbeat step when the failure was detected
    detected: float
    resubmitted: float | None = None
    allocated: float | None = None
    rendezvous: float | None = None
    first_step: float | None = None

    @property
    def finished(self) -> bool:
        return self.first_step is not None

    def phases(self) -> dict[str, float]:
        """The phases reached so far, by RecoveryPhase value (the `recovery` event's data)."""
        reached = {phase.value: getattr(self, phase.value) for phase in RecoveryPhase}
        return {name: value for name, value in reached.items() if value is not None}

    def advance(self, job: JobRow | None, beats: list[Heartbeat]) -> bool:
        """Fill in the phases this tick's job row and heartbeats show; True when it just finished."""
        if self.finished:
            return False
        if self.allocated is None and job is not None and job.started_at:
            self.allocated = job.started_at
        fresh = [beat for beat in beats if beat.started > self.detected]  # trainers started after the failure
        if self.allocated is not None and self.rendezvous is None and fresh:
            self.rendezvous = min(beat.started for beat in fresh)
        # The first step's own time: the heartbeat's `time` is its latest write, up to a tick later.
        stepped = [beat.first_step_at or beat.time for beat in fresh if beat.stepped]
        if self.rendezvous is not None and stepped:
            self.first_step = min(stepped)
            return True
        return False


class RecoveryTimeline:
    """The open recoveries of one stage; writes a `recovery` event as each one finishes."""

    def __init__(self, store: StateStore, stage: str) -> None:
        self.store = store
        self.stage = stage
        self.recoveries: list[Recovery] = []

    def open(
        self, *, node_rank: int, new_job_row: int, step_at_failure: int, detected: float, resubmitted: float
    ) -> Recovery:
        """Start the timeline of a repair whose replacement was just submitted."""
        recovery = Recovery(
            id=len(self.recoveries) + 1,
            node_rank=node_rank,
            new_job_row=new_job_row,
            step_at_failure=step_at_failure,
            detected=detected,
            resubmitted=resubmitted,
        )
        self.recoveries.append(recovery)
        return recovery

    @property
    def pending(self) -> list[Recovery]:
        return [recovery for recovery in self.recoveries if not recovery.finished]

    def track(self, beats: list[Heartbeat]) -> None:
        """Advance every open recovery; a finished one becomes a `recovery` event."""
        for recovery in self.pending:
            if recovery.advance(self.store.job(recovery.new_job_row), beats):
                assert recovery.first_step is not None
                self.store.event(
                    "recovery",
                    f"node {recovery.node_rank} recovered in {recovery.first_step - recovery.detected:.1f}s",
                    stage=self.stage,
                    node_rank=recovery.node_rank,
                    phases=recovery.phases(),
                    step_at_failure=recovery.step_at_failure,
                )
