"""`actions.cancel_run` (what `fm9g-launch cancel` and the TUI's `c` call): through the
supervisor's cancel flag while a supervisor holds the run's lock, through the executor
only when none does; an event records which path was taken.  The jobs are real local
`sleep` jobs started through the LocalExecutor."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fm9g.orchestrator.actions import CancelError, CancelPath, cancel_run
from fm9g.orchestrator.cli import main
from fm9g.orchestrator.executors.local import LocalExecutor
from fm9g.orchestrator.state import JobState, StageStatus, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text


class Run:
    """A run directory whose train stage has two live node jobs: real `sleep` jobs."""

    def __init__(self, root: Path, executor: LocalExecutor) -> None:
        self.run = RunDir.of(root / "runs" / "r").make()
        self.executor = executor
        write_text(self.run.config, cfg.dump(cfg.RunConfig()))
        self.job_ids: list[str] = []
        store = StateStore(self.run.state_db)
        try:
            store.set_meta("executor", "local")
            store.upsert_stage("train", "train")
            store.set_stage("train", "RUNNING")
            for rank in range(2):
                role = "master" if rank == 0 else "worker"
                script = write_text(self.run.scripts / f"{role}{rank}.sh", "#!/bin/bash\nexec sleep 600\n")
                log = self.run.stage_logs("train") / f"{role}{rank}-a1.out"
                tag = f"fm9g:r:train:{rank}:1"
                row = store.record_intent(
                    stage="train",
                    role=role,
                    node_rank=rank,
                    attempt=1,
                    generation=0,
                    tag=tag,
                    script=str(script),
                    script_hash="0" * 12,
                    log=str(log),
                )
                job_id = executor.submit(script, log=log, tag=tag)
                store.mark_submitted(row, job_id)
                store.update_job(row, state=JobState.RUNNING, node="localhost", started_at=time.time())
                self.job_ids.append(job_id)
        finally:
            store.close()

    def alive(self, job_id: str) -> bool:
        return self.executor.owns(job_id)

    def ended(self, job_id: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(job_id):
                return True
            time.sleep(0.05)
        return False

    def read(self) -> tuple[list, dict[str, JobState], StageStatus]:
        store = StateStore(self.run.state_db, readonly=True)
        try:
            stage = store.stage("train")
            assert stage is not None
            return store.events(kind="cancel"), {str(r.job_id): r.state for r in store.jobs()}, stage.status
        finally:
            store.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Run]:
    executor = LocalExecutor()
    run = Run(tmp_path, executor)
    try:
        yield run
    finally:
        for job_id in run.job_ids:
            executor.kill(job_id)
        executor.poll(run.job_ids)  # reaps them


@pytest.fixture
def supervisor_lock() -> Iterator:
    """Hold a run's lock as a live supervisor does: an flock on its own open file."""
    handles = []

    def hold(run: RunDir) -> None:
        handle = open(run.lock, "a+")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handles.append(handle)

    yield hold
    for handle in handles:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def test_with_a_supervisor_the_cancel_goes_through_its_flag(demo: Run, supervisor_lock) -> None:
    supervisor_lock(demo.run)
    result = cancel_run(demo.run)
    assert result.path is CancelPath.SUPERVISOR and list(result.job_ids) == demo.job_ids
    assert demo.run.cancel_flag.exists()
    assert all(demo.alive(job_id) for job_id in demo.job_ids)  # the supervisor cancels them, not this process
    events, states, stage = demo.read()
    assert [(e.data["path"], e.data["job_ids"]) for e in events] == [("supervisor", demo.job_ids)]
    assert set(states.values()) == {JobState.RUNNING} and stage is StageStatus.RUNNING  # the supervisor's to write


def test_without_a_supervisor_the_executor_cancels_and_the_ends_are_recorded(demo: Run) -> None:
    result = cancel_run(demo.run)
    assert result.path is CancelPath.EXECUTOR and list(result.job_ids) == demo.job_ids
    assert all(demo.ended(job_id) for job_id in demo.job_ids)
    assert demo.run.cancel_flag.exists()  # a later `resume` reads the ends as the user's decision
    events, states, stage = demo.read()
    assert [(e.data["path"], e.data["supervised"]) for e in events] == [("executor", False)]
    assert set(states.values()) == {JobState.CANCELLED} and stage is StageStatus.CANCELLED


def test_one_job_is_cancelled_through_the_executor_even_with_a_supervisor(demo: Run, supervisor_lock) -> None:
    supervisor_lock(demo.run)
    master, worker = demo.job_ids
    result = cancel_run(demo.run, job_id=worker)
    assert result.path is CancelPath.EXECUTOR and result.job_ids == (worker,)
    assert demo.ended(worker) and demo.alive(master)
    assert not demo.run.cancel_flag.exists()  # the run goes on: the supervisor replaces the node
    events, states, _ = demo.read()
    assert [(e.data["path"], e.data["supervised"]) for e in events] == [("executor", True)]
    assert states[worker] is JobState.RUNNING  # the supervisor sees the end and records it


def test_cancel_of_an_unknown_job_says_so(demo: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CancelError):
        cancel_run(demo.run, job_id="424242")
    assert main(["cancel", str(demo.run.root), "--job", "424242"]) == 2
    assert all(demo.alive(job_id) for job_id in demo.job_ids)
    assert demo.read()[0] == []
    assert main(["cancel", str(demo.run.root)]) == 0
    assert all(demo.ended(job_id) for job_id in demo.job_ids)
    capsys.readouterr()
