"""Waiting node-seconds (orchestrator/waiting.py): the pure sweep on hand-made spans, and
the same figure read from job rows written with the real StateStore."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.orchestrator.state import JobState, StateStore
from fm9g.orchestrator.waiting import NodeSpan, run_waiting, spans, stage_waiting, waiting_node_seconds
from fm9g.rundir import RunDir

T0 = 1_000.0


def test_staggered_start_counts_the_early_nodes_until_the_last_one_starts() -> None:
    # Three nodes: the master at 0, a worker at 10, the last at 30; all run to 100.
    node_spans = [NodeSpan(0, T0, None), NodeSpan(1, T0 + 10, None), NodeSpan(2, T0 + 30, None)]
    # 1 node for 10 s, then 2 nodes for 20 s; nothing once all three run.
    assert waiting_node_seconds(node_spans, 3, T0 + 100) == pytest.approx(1 * 10 + 2 * 20)


def test_nodes_that_start_together_wait_for_nothing() -> None:
    node_spans = [NodeSpan(rank, T0, None) for rank in range(4)]
    assert waiting_node_seconds(node_spans, 4, T0 + 500) == 0.0


def test_a_waiting_stage_counts_up_to_now() -> None:
    # Only the master started: it waits as long as the clock runs.
    node_spans = [NodeSpan(0, T0, None)]
    assert waiting_node_seconds(node_spans, 2, T0 + 7) == pytest.approx(7)
    assert waiting_node_seconds(node_spans, 2, T0 + 70) == pytest.approx(70)


def test_a_replacement_in_the_queue_counts_the_survivors() -> None:
    # Worker 2 is lost at 50; its replacement starts at 80.  Nodes 0 and 1 hold on meanwhile.
    node_spans = [
        NodeSpan(0, T0, None),
        NodeSpan(1, T0, None),
        NodeSpan(2, T0, T0 + 50),
        NodeSpan(2, T0 + 80, None),
    ]
    assert waiting_node_seconds(node_spans, 3, T0 + 200) == pytest.approx(2 * 30)


def test_a_node_that_fails_leaves_the_others_waiting_but_one_that_finished_does_not() -> None:
    # The worker fails at 100 and the master holds on until it is stopped at 103.
    failed = [NodeSpan(0, T0, T0 + 103), NodeSpan(1, T0, T0 + 100)]
    assert waiting_node_seconds(failed, 2, T0 + 500) == pytest.approx(3)
    # Training done: the worker exits 0 at 100, the master finishes at 103.  Finishing is no wait.
    finished = [NodeSpan(0, T0, T0 + 103, clean=True), NodeSpan(1, T0, T0 + 100, clean=True)]
    assert waiting_node_seconds(finished, 2, T0 + 500) == 0.0


def test_after_a_continue_the_fresh_start_counts_again() -> None:
    # Both checkpoint on a walltime signal (exit 75) at 100 and 101; the fresh jobs start
    # at 200 and 230: the first waits 30 s for the second.
    node_spans = [
        NodeSpan(0, T0, T0 + 101, clean=True),
        NodeSpan(1, T0, T0 + 100, clean=True),
        NodeSpan(0, T0 + 200, None),
        NodeSpan(1, T0 + 230, None),
    ]
    assert waiting_node_seconds(node_spans, 2, T0 + 300) == pytest.approx(30)


def test_an_overlapping_attempt_of_one_rank_is_not_a_second_node() -> None:
    # A master's old job still ending (to 60) while its replacement already runs (from 55):
    # two jobs of rank 0, but only one of the two ranks is there until 70.
    node_spans = [NodeSpan(0, T0, T0 + 60), NodeSpan(0, T0 + 55, None), NodeSpan(1, T0 + 70, None)]
    # 1 job for 55 s, 2 jobs (both rank 0) for 5 s, 1 job for 10 s.
    assert waiting_node_seconds(node_spans, 2, T0 + 100) == pytest.approx(55 + 2 * 5 + 10)


def test_nothing_started_and_nothing_live_count_nothing_more() -> None:
    assert waiting_node_seconds([], 4, T0) == 0.0
    # Resumed later with every row ended: the past is counted, the time since is not.
    ended = [NodeSpan(0, T0, T0 + 100), NodeSpan(1, T0 + 20, T0 + 100)]
    assert waiting_node_seconds(ended, 2, T0 + 10_000) == pytest.approx(20)
    assert waiting_node_seconds(ended, 2, T0 + 100) == waiting_node_seconds(ended, 2, T0 + 10_000)


def test_a_span_is_clipped_at_now() -> None:
    # `now` before a recorded start (clock skew between hosts): nothing from that span.
    assert waiting_node_seconds([NodeSpan(0, T0 + 50, None)], 2, T0) == 0.0
    assert waiting_node_seconds([NodeSpan(0, T0, T0 + 50)], 2, T0 + 20) == pytest.approx(20)


def _job(store: StateStore, rank: int, attempt: int, **fields: object) -> int:
    row = store.record_intent(
        stage="train",
        role="master" if rank == 0 else "worker",
        node_rank=rank,
        attempt=attempt,
        generation=0,
        tag=f"fm9g:w:train:{rank}:{attempt}",
        script="s.sh",
        script_hash="0" * 12,
        log="x.out",
    )
    store.mark_submitted(row, str(100 + row))
    store.update_job(row, **fields)
    return row


def test_rows_from_state_db(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "w").make()
    store = StateStore(run.state_db)
    try:
        assert run_waiting(run, T0) is None  # no training stage yet
        store.set_meta("nodes", 3)
        store.upsert_stage("train", "train")
        _job(store, 0, 1, state="RUNNING", started_at=T0)
        _job(store, 1, 1, state="RUNNING", started_at=T0 + 10)
        _job(store, 2, 1, state="NODE_FAIL", started_at=T0 + 10, ended_at=T0 + 40)
        _job(store, 2, 2, state="PENDING")  # the replacement, still queued: holds nothing
        # Until 10: 1 node; 10..40 all three; 40..100: 2 nodes hold on.
        expected = 1 * 10 + 2 * 60
        assert stage_waiting(store, "train", 3, T0 + 100) == pytest.approx(expected)
        assert run_waiting(run, T0 + 100) == pytest.approx(expected)
    finally:
        store.close()


def test_a_row_ended_clean_by_its_exit_code_or_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    try:
        _job(store, 0, 1, state="COMPLETED", exit_code=0, started_at=T0, ended_at=T0 + 9)
        _job(store, 1, 1, state="FAILED", exit_code=75, started_at=T0, ended_at=T0 + 9)  # continue
        _job(store, 2, 1, state="FAILED", exit_code=1, started_at=T0, ended_at=T0 + 9)
        _job(store, 3, 1, state="RUNNING", started_at=T0)
        assert [span.clean for span in spans(store.jobs("train"))] == [True, True, False, False]
    finally:
        store.close()


def test_an_ended_row_without_end_time_ends_when_it_was_written(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    try:
        row = _job(store, 0, 1, state="RUNNING", started_at=T0)
        store.update_job(row, state=JobState.CANCELLED)
        (span,) = spans(store.jobs("train"))
        job = store.job(row)
        assert job is not None and span.end == job.updated_at
    finally:
        store.close()
