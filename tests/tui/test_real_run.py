"""The TUI on the state a REAL run produced: a 2-node local run in which a worker node
was killed and repaired.  Navigation, the step count, the failure timeline, log follow
and the filter, on what the supervisor and trainer actually wrote."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fm9g.orchestrator.tui.app import make_app
from fm9g.orchestrator.tui.screens.main import MainScreen
from fm9g.orchestrator.tui.widgets.failure_timeline import FailureTimeline
from fm9g.orchestrator.tui.widgets.job_table import JobTable
from fm9g.orchestrator.tui.widgets.log_pane import LogPane
from fm9g.orchestrator.tui.widgets.training_panel import TrainingPanel
from tests.helpers import runs

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # the module fixture trains a 2-node run
ITERS = 24


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fm9g.orchestrator.executors.local import LocalExecutor

    root = tmp_path_factory.mktemp("real")
    proc = runs.start_tiny(
        root,
        "real",
        "--nodes",
        "2",
        "--set",
        f"train.train_iters={ITERS}",
        "--set",
        "train.save_iters=4",
        "--set",
        "train.warmup_iters=2",
        "--set",
        "train.step_sleep=0.3",
        "--set",
        "supervise.repair_local=true",
        poll_interval=0.3,
    )
    run = root / "real"
    runs.wait_for(lambda: runs.checkpoint_step(run) >= 8 or proc.poll() is not None, 300, "the run to reach step 8")
    assert proc.poll() is None, "the run ended before step 8"
    # The worker node dies; the supervisor repairs it.
    LocalExecutor().kill(runs.live_job(run, "worker").job_id)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return run


async def settle(pilot, rounds: int = 3) -> None:  # noqa: ANN001
    for _ in range(rounds):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


async def test_real_run_shows_nodes_progress_and_the_repair(real_run: Path) -> None:
    app = make_app(real_run)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        table = screen.query_one(JobTable)
        jobs = [
            str(table.get_cell(row.key, "job")).strip()
            for row in table.ordered_rows
            if str(row.key.value).startswith("job:")
        ]
        assert any("master" in job for job in jobs)
        assert sum("r1 worker" in job for job in jobs) == 2  # the killed attempt and its replacement
        panel = screen.query_one(TrainingPanel)
        assert panel.metrics is not None and panel.metrics.last is not None and panel.metrics.last.step == ITERS
        assert f"step {ITERS}/{ITERS}" in str(panel.render())
        timeline = screen.query_one(FailureTimeline)
        kinds = [str(timeline.get_row_at(i)[1]) for i in range(timeline.row_count)]
        assert "failure" in kinds


async def test_real_run_log_follow_and_filter(real_run: Path) -> None:
    app = make_app(real_run, interval=0.2)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobTable)
        # put the cursor on the master's row: its log is the real master log
        master_row = next(
            i for i, row in enumerate(table.ordered_rows) if "master" in str(table.get_cell(row.key, "job"))
        )
        for _ in range(master_row - table.cursor_row):
            await pilot.press("down")
        await settle(pilot)
        log = app.screen.query_one(LogPane)
        assert log.path is not None and log.path.name == "master0-a1.out"
        assert any("world_size=2" in line for line in log.lines)
        with open(log.path, "a") as handle:
            handle.write("appended by the test\n")
        deadline = time.monotonic() + 20
        while not any("appended by the test" in line for line in log.lines):
            assert time.monotonic() < deadline, "the log pane did not follow the append"
            await pilot.pause(0.2)
            await settle(pilot, 1)
        await pilot.press("slash", *"worker")
        await settle(pilot)
        shown = [
            str(table.get_cell(row.key, "job")) for row in table.ordered_rows if str(row.key.value).startswith("job:")
        ]
        assert shown and all("worker" in job for job in shown)
