"""`reconcile`: state.db catches up with the files a run's jobs left behind (exit
records, `<log>.rc`, control/DONE) while no supervisor holds the run's lock, and `status`
does it before it reports."""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm9g.orchestrator.cli import main
from fm9g.orchestrator.reconcile import CLOCK_SKEW_S, reconcile, reconcile_run, supervised
from fm9g.orchestrator.state import JobState, StageStatus, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_json, write_text


def make_run(root: Path, nodes: int = 2) -> tuple[RunDir, dict[int, int]]:
    """A run whose supervisor was killed: the train stage and `nodes` node jobs RUNNING."""
    run = RunDir.of(root / "runs" / "r").make()
    write_text(run.config, cfg.dump(cfg.RunConfig()))
    store = StateStore(run.state_db)
    try:
        store.set_meta("executor", "slurm")
        store.upsert_stage("train", "train")
        store.set_stage("train", "RUNNING")
        rows = {}
        for rank in range(nodes):
            role = "master" if rank == 0 else "worker"
            log = run.stage_logs("train") / f"{role}{rank}-a1.out"
            row = store.record_intent(
                stage="train",
                role=role,
                node_rank=rank,
                attempt=1,
                generation=0,
                tag=f"fm9g:r:train:{rank}:1",
                script="s.sh",
                script_hash="0" * 12,
                log=str(log),
            )
            store.mark_submitted(row, str(9000 + rank))
            store.update_job(row, state=JobState.RUNNING, node=f"cn0{rank}", started_at=time.time())
            rows[rank] = row
    finally:
        store.close()
    return run, rows


def exit_record(run: RunDir, job_id: str, code: int, when: float | None = None) -> float:
    when = time.time() if when is None else when
    write_json(run.exit_record(job_id), {"code": code, "time": when, "node_rank": 0, "role": "master"})
    return when


@pytest.fixture
def store_of() -> Iterator:
    opened: list[StateStore] = []

    def open_store(run: RunDir, readonly: bool = False) -> StateStore:
        opened.append(StateStore(run.state_db, readonly=readonly))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def held_lock() -> Iterator:
    """Hold a run's lock the way a supervisor does (an flock on its own open file)."""
    handles = []

    def hold(run: RunDir) -> None:
        handle = open(run.lock, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handles.append(handle)

    yield hold
    for handle in handles:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def test_exit_records_and_done_complete_the_run(tmp_path: Path, store_of) -> None:
    run, rows = make_run(tmp_path)
    ended = {rank: exit_record(run, str(9000 + rank), 0) for rank in rows}
    write_json(run.done_flag, {"step": 10, "time": time.time()})
    store = store_of(run)
    changes = reconcile(run, store)
    assert len(changes) == 3  # two job ends and the stage
    for rank, row_id in rows.items():
        row = store.job(row_id)
        assert row is not None and row.state is JobState.COMPLETED and row.exit_code == 0
        assert row.ended_at == pytest.approx(ended[rank])
    stage = store.stage("train")
    assert stage is not None and stage.status is StageStatus.COMPLETED and stage.progress == 1.0
    events = store.events(kind="reconciled")
    assert sorted(e.job for e in events if e.job is not None) == sorted(rows.values())
    assert [e.stage for e in events if e.job is None] == ["train"]
    assert reconcile(run, store) == []  # done once


def test_nothing_is_written_while_a_supervisor_holds_the_lock(tmp_path: Path, store_of, held_lock) -> None:
    run, rows = make_run(tmp_path)
    for rank in rows:
        exit_record(run, str(9000 + rank), 0)
    write_json(run.done_flag, {"step": 10})
    held_lock(run)
    assert supervised(run)
    store = store_of(run)
    assert reconcile(run, store) == []
    assert all(row.state is JobState.RUNNING for row in store.jobs())
    stage = store.stage("train")
    assert stage is not None and stage.status is StageStatus.RUNNING
    assert store.events(kind="reconciled") == []
    # the supervisor that holds it may reconcile itself
    assert len(reconcile(run, store, holding_lock=True)) == 3


def test_a_local_rc_file_ends_the_job_and_done_waits_for_every_job(tmp_path: Path, store_of) -> None:
    run, rows = make_run(tmp_path)
    store = store_of(run)
    log = Path(store.job(rows[1]).log)  # type: ignore[union-attr]
    write_text(log.with_name(log.name + ".rc"), "3\n")
    write_json(run.done_flag, {"step": 10})
    reconcile(run, store)
    worker = store.job(rows[1])
    assert worker is not None and worker.state is JobState.FAILED and worker.exit_code == 3
    master = store.job(rows[0])
    assert master is not None and master.state is JobState.RUNNING  # nothing says it ended
    stage = store.stage("train")
    assert stage is not None and stage.status is StageStatus.RUNNING  # not every job ended


def test_a_record_older_than_the_job_is_not_its_end(tmp_path: Path, store_of) -> None:
    run, rows = make_run(tmp_path, nodes=1)
    store = store_of(run)
    submitted = store.job(rows[0]).submitted_at  # type: ignore[union-attr]
    exit_record(run, "9000", 1, when=submitted - CLOCK_SKEW_S - 10)  # an earlier job with the same id (a reused pid)
    assert reconcile(run, store) == []
    write_text(run.exit_record("9000"), "not json")
    assert reconcile(run, store) == []


def test_status_reconciles_before_it_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str], store_of) -> None:
    run, rows = make_run(tmp_path)
    for rank in rows:
        exit_record(run, str(9000 + rank), 0)
    write_json(run.done_flag, {"step": 10})
    assert main(["status", "--json", str(run.root)]) == 0
    facts = json.loads(capsys.readouterr().out)["runs"][0]
    assert facts["status"] == "COMPLETED" and {job["state"] for job in facts["jobs"]} == {"COMPLETED"}
    assert len(store_of(run, readonly=True).events(kind="reconciled")) == 3


def test_a_viewer_that_finds_nothing_to_do_writes_nothing(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    before = run.state_db.stat().st_mtime_ns
    assert reconcile_run(run) == []
    assert run.state_db.stat().st_mtime_ns == before and not run.lock.exists()


def test_an_index_stage_whose_jobs_completed_unwatched_completes(tmp_path: Path, store_of) -> None:
    """Ctrl-C during indexing: the shard and merge jobs finish alone; the stage row follows."""
    run, _ = make_run(tmp_path)
    store = store_of(run)
    store.upsert_stage("index:wiki", "index")
    store.set_stage("index:wiki", "RUNNING")
    ids = []
    for role in ("shard", "merge"):
        log = run.stage_logs("index-wiki") / f"index-wiki-{role}0-a1.out"
        row = store.record_intent(
            stage="index:wiki",
            role=role,
            node_rank=0,
            attempt=1,
            generation=0,
            tag=f"t:{role}",
            script="s.sh",
            script_hash="0" * 12,
            log=str(log),
        )
        store.mark_submitted(row, str(7000 + len(ids)))
        store.update_job(row, state=JobState.RUNNING, started_at=time.time())
        write_text(log.with_name(log.name + ".rc"), "0\n")  # the local executor's exit-code file
        ids.append(row)
    reconcile(run, store)
    assert store.stage("index:wiki").status is StageStatus.COMPLETED
    assert all(store.job(row).state is JobState.COMPLETED for row in ids)
    assert any(event.stage == "index:wiki" for event in store.events("reconciled"))
    assert store.stage("train").status is StageStatus.RUNNING  # no DONE: training did not finish
