"""The supervisor job's phase as viewers derive it (orchestrator/supervisor_state.py),
from events written with the real StateStore in the order supervisor_job writes them."""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator import supervisor_job, supervisor_state
from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.supervisor_state import SupervisorJob, SupervisorPhase, follow, with_lock


def test_event_kinds_are_those_supervisor_job_writes() -> None:
    assert supervisor_state.EVENT_SUBMITTED == supervisor_job.EVENT_SUBMITTED
    assert supervisor_state.EVENT_HANDOVER == supervisor_job.EVENT_HANDOVER
    assert supervisor_state.EVENT_END == supervisor_job.EVENT_END


def test_launch_start_hand_over_and_end(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    try:
        seen = 0

        def step(current: SupervisorJob | None) -> SupervisorJob | None:
            nonlocal seen
            new = store.events(since_id=seen)
            seen = store.max_event_id()
            return follow(new, current)

        assert step(None) is None
        store.event("supervisor_job", "supervisor job 10 submitted (launch)", job_id="10", why="launch")
        store.event("supervisor_guard", "guard supervisor job 11 waits on job 10", job_id="11", guards="10")
        current = step(None)
        assert current == SupervisorJob("10", SupervisorPhase.QUEUED)
        store.event("supervisor_job", "supervisor job 10 started on cn01", job_id="10", why="start")
        current = step(current)
        assert current == SupervisorJob("10", SupervisorPhase.RUNNING)
        # Before its walltime: it submits its successor, then says it hands over.
        store.event("supervisor_job", "supervisor job 12 submitted (hand-over)", job_id="12", why="hand-over")
        store.event("supervisor_handover", "job 10 hands over to job 12", job_id="10", successor="12")
        current = step(current)
        assert current == SupervisorJob("12", SupervisorPhase.QUEUED)
        store.event("supervisor_job", "supervisor job 12 started on cn02", job_id="12", why="start")
        store.event("supervisor_end", "supervisor job 12 ended: supervise returned 0")
        current = step(current)
        assert current == SupervisorJob("12", SupervisorPhase.ENDED)
        # Read all at once, the same answer.
        assert follow(store.events(), None) == current
    finally:
        store.close()


def test_a_started_job_without_the_lock_is_lost() -> None:
    started = SupervisorJob("10", SupervisorPhase.RUNNING)
    assert with_lock(started, holds_lock=True) == started
    assert with_lock(started, holds_lock=False).phase is SupervisorPhase.LOST
    queued = SupervisorJob("10", SupervisorPhase.QUEUED)
    assert with_lock(queued, holds_lock=False) == queued
