"""The state store: intent before submission, live/terminal queries, events, and
concurrent readers while a writer works (WAL)."""

from __future__ import annotations

from pathlib import Path

from fm9g.orchestrator.state import StateStore


def test_intent_then_submission(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    row = store.record_intent(
        stage="train",
        role="master",
        node_rank=0,
        attempt=1,
        generation=0,
        tag="fm9g:x:train:master:0:1",
        script="/s",
        script_hash="abc",
        log="/l",
    )
    (job,) = store.jobs("train")
    assert job.state == "SUBMITTING" and job.job_id is None and job.live
    store.mark_submitted(row, "1234")
    store.update_job(row, state="RUNNING", node="node3", started_at=1.0)
    reader = StateStore(tmp_path / "state.db", readonly=True)
    (job,) = reader.jobs("train", live_only=True)
    assert (job.job_id, job.state, job.node) == ("1234", "RUNNING", "node3")
    store.update_job(row, state="NODE_FAIL", ended_at=2.0)
    assert reader.jobs("train", live_only=True) == []
    reader.close()
    store.close()


def test_stages_and_events(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.upsert_stage("index:zh", "index")
    store.upsert_stage("train", "train", depends_on=["index:zh"])
    store.set_stage("index:zh", "RUNNING")
    store.set_stage_progress("index:zh", 0.5)
    store.set_stage("index:zh", "COMPLETED")
    stages = {s.name: s for s in store.stages()}
    assert stages["index:zh"].status == "COMPLETED" and stages["index:zh"].ended_at is not None
    assert stages["train"].depends_on == ["index:zh"] and stages["train"].status == "PENDING"
    store.event("failure", "worker 1 died", stage="train", klass="infrastructure")
    (event,) = store.events("failure")
    assert event.data == {"klass": "infrastructure"} and event.message == "worker 1 died"
    store.set_meta("retries_used", {"application": 2})
    assert store.meta("retries_used") == {"application": 2}
    store.close()
