"""Ctrl-C while `infer`, `convert` or `serve` follows its job: a local job is a process
this command started, so it stops with the command; the interrupt is on the record.
The job is a real local `sleep` job started through the LocalExecutor."""

from __future__ import annotations

import _thread
import signal
import threading
import time
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.local import LocalExecutor
from fm9g.orchestrator.inference.jobs import stage_context, wait
from fm9g.orchestrator.state import JobState, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir import config as cfg
from fm9g.rundir.atomic import write_text


def test_ctrl_c_while_following_a_local_job_stops_the_job(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "runs" / "r").make()
    config = cfg.RunConfig()
    write_text(run.config, cfg.dump(config))
    executor = LocalExecutor()
    store = StateStore(run.state_db)
    said: list[str] = []
    ctx = stage_context(run, config, store, executor, said.append)
    script = write_text(run.scripts / "infer.sh", "#!/bin/bash\nexec sleep 600\n")
    log = run.stage_logs("infer") / "infer-a1.out"
    row_id = store.record_intent(
        stage="infer", role="infer", node_rank=0, attempt=1, generation=0, tag="fm9g:r:infer:0:1",
        script=str(script), script_hash="0" * 12, log=str(log),
    )  # fmt: skip
    job_id = executor.submit(script, log=log, tag="fm9g:r:infer:0:1")
    store.mark_submitted(row_id, job_id)
    row = store.job(row_id)
    assert row is not None
    # interrupt_main does nothing while SIGINT is ignored (a suite started in the background).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(1.0, _thread.interrupt_main).start()  # the Ctrl-C, while wait() polls
    try:
        with pytest.raises(KeyboardInterrupt):
            wait(ctx, row)
        deadline = time.monotonic() + 10
        while executor.owns(job_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not executor.owns(job_id), "the local job outlived the Ctrl-C"
        ended = store.job(row_id)
        assert ended is not None and ended.state is JobState.CANCELLED
        [event] = store.events(kind="interrupt")
        assert event.data["job_ids"] == [job_id] and event.stage == "infer"
    finally:
        signal.signal(signal.SIGINT, previous)
        executor.kill(job_id)
        store.close()
