"""The TUI driven by Textual's pilot against a run directory: navigation at 80x24 and
at a large size, log following, the filter, run switching, read-only, cancel through
the confirmation modal (killing real processes), resubmit, help."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Button

from fm9g.orchestrator import actions
from fm9g.orchestrator.launch import SupervisorLock
from fm9g.orchestrator.state import JobState, StageStatus, StateStore
from fm9g.orchestrator.supervisor_state import SupervisorJob, SupervisorPhase
from fm9g.orchestrator.tui.app import make_app
from fm9g.orchestrator.tui.screens.confirm import ConfirmScreen
from fm9g.orchestrator.tui.screens.help import HelpScreen
from fm9g.orchestrator.tui.screens.main import MainScreen
from fm9g.orchestrator.tui.widgets.failure_timeline import FailureTimeline
from fm9g.orchestrator.tui.widgets.job_table import JobTable
from fm9g.orchestrator.tui.widgets.log_pane import LogPane
from fm9g.orchestrator.tui.widgets.run_header import RunHeader
from fm9g.orchestrator.tui.widgets.run_list import RunList
from fm9g.orchestrator.tui.widgets.training_panel import TrainingPanel

from .conftest import NOW, STEPS, TRAIN_ITERS, DemoRun, LocalJobs, add_inproc_events, make_demo_run

# anyio's pytest plugin runs the async tests (anyio comes with the dev extra, via openai).
pytestmark = pytest.mark.anyio
SIZES = [(80, 24), (200, 60)]
# Row order: index stage, its job, train stage, r0 a1, r1 a1, r2 a1 (failed), r2 a2 (resubmitted)
ROW_R1, ROW_R2_FAILED, ROW_R2_NEW = 4, 5, 6


def keys_of(table: JobTable) -> list[str]:
    return [str(row.key.value) for row in table.ordered_rows]


def cell(table: JobTable, key: str, column: str) -> str:
    return str(table.get_cell(key, column))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_navigation_shows_stages_attempts_and_progress(demo_run: DemoRun, size: tuple[int, int], settle) -> None:
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        table = screen.query_one(JobTable)
        rows = demo_run.rows
        assert keys_of(table) == [
            "stage:index",
            f"job:{rows['index']}",
            "stage:train",
            f"job:{rows['r0a1']}",
            f"job:{rows['r1a1']}",
            f"job:{rows['r2a1']}",
            f"job:{rows['r2a2']}",
        ]
        failed, new = f"job:{rows['r2a1']}", f"job:{rows['r2a2']}"
        assert cell(table, f"job:{rows['r0a1']}", "job").strip() == "a1 r0 master"
        assert cell(table, failed, "job").strip() == "r2 worker" and cell(table, new, "job").strip() == "a2 r2 worker"
        assert cell(table, failed, "state") == "NODE_FAIL node lost"
        assert cell(table, new, "id") == demo_run.job_ids["r2a2"] and cell(table, new, "node") == "cn04"
        assert cell(table, f"job:{rows['r0a1']}", "elapsed") == "56:45"  # NOW - started, from the app's clock
        assert cell(table, "stage:train", "state") == "RUNNING 60%"
        panel = screen.query_one(TrainingPanel)
        assert panel.metrics is not None and panel.metrics.last is not None
        assert panel.metrics.last.step == STEPS and panel.metrics.train_iters == TRAIN_ITERS
        assert set(panel.metrics.tasks) == {"wiki", "code", "chat"}
        assert f"step {STEPS}/{TRAIN_ITERS}" in str(panel.render())
        assert screen.query_one(RunHeader).view is not None
        # the failure timeline has the failure and the recovery with its phases
        timeline = screen.query_one(FailureTimeline)
        kinds = [str(timeline.get_row_at(i)[1]) for i in range(timeline.row_count)]
        assert kinds == ["stage_end", "failure", "recovery"]
        assert "rdzv +32.0s" in str(timeline.get_row_at(2)[3])
        # moving down the table follows each job's log
        for _ in range(ROW_R2_NEW):
            await pilot.press("down")
        await settle(pilot)
        assert table.cursor_row == ROW_R2_NEW
        log = screen.query_one(LogPane)
        assert log.path == demo_run.log("r2a2")
        assert "[r2a2] step 5" in "\n".join(log.lines)
        # t shows the failures, l the log again
        await pilot.press("t")
        assert screen.query_one("#lower").has_class("-show-timeline")
        await pilot.press("l")
        assert screen.query_one("#lower").has_class("-show-log") and screen.maximized is None
        # l again: the log takes the screen (on a wide one the first l focused it); esc gives it back
        assert screen.has_class("-narrow" if size[0] < 120 else "-wide")
        await pilot.press("l")
        assert screen.maximized is log
        await pilot.press("escape")
        assert screen.maximized is None


async def test_log_pane_follows_appends_truncation_and_rotation(demo_run: DemoRun, settle) -> None:
    app = make_app(demo_run.run.root, clock=lambda: NOW, interval=0.05)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        for _ in range(ROW_R1):
            await pilot.press("down")
        await settle(pilot)
        log = app.screen.query_one(LogPane)
        path = demo_run.log("r1a1")
        assert log.path == path
        # the timer alone picks up appended lines
        with open(path, "a") as handle:
            handle.write("step 6 loss 2.0\nstep 7 lo")
        for _ in range(200):
            await pilot.pause(0.05)
            if log.lines and log.lines[-1] == "step 7 lo":
                break
        assert "step 6 loss 2.0" in log.lines and log.lines[-1] == "step 7 lo"
        with open(path, "a") as handle:
            handle.write("ss 1.9\n")
        app.screen.refresh_now()
        await settle(pilot)
        assert "step 7 loss 1.9" in log.lines
        # truncation: the pane marks it and shows the new content
        path.write_text("restarted\n")
        app.screen.refresh_now()
        await settle(pilot)
        assert any("truncated or rotated" in line for line in log.lines) and log.lines[-2] == "restarted"
        # rotation: the new file is followed
        path.rename(path.with_name(path.name + ".1"))
        path.write_text("after rotation\n")
        app.screen.refresh_now()
        await settle(pilot)
        assert "after rotation" in log.lines


async def test_filter_narrows_the_job_rows(demo_run: DemoRun, settle) -> None:
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobTable)
        await pilot.press("slash")
        await pilot.press(*"r2")
        await settle(pilot)
        rows = demo_run.rows
        assert keys_of(table) == ["stage:train", f"job:{rows['r2a1']}", f"job:{rows['r2a2']}"]
        await pilot.press("enter")  # keep the filter, back to the table
        assert table.has_focus and table.border_title == "jobs · filter: r2"
        await pilot.press("slash", "ctrl+u", *"node_fail")
        await settle(pilot)
        assert keys_of(table) == ["stage:train", f"job:{rows['r2a1']}"]
        await pilot.press("escape")  # clears
        await settle(pilot)
        assert len(keys_of(table)) == 7 and table.border_title == "jobs"
        await pilot.press("slash", *"nothing-matches", "enter")
        await settle(pilot)
        assert keys_of(table) == []


async def test_header_shows_waiting_node_seconds_and_the_supervisor_job(demo_run: DemoRun, settle) -> None:
    # The demo's nodes started at +320, +321 and +322; worker 2 was lost at +1500 and its
    # replacement started at +1530: 1x1 + 2x1 + 2x30 node-seconds waiting.
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(200, 30)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        header = screen.query_one(RunHeader)
        assert header.view is not None and header.view.waiting_node_s == pytest.approx(63.0)
        assert header.view.supervisor is None
        assert "waiting 63.0 node-s" in str(header.render()) and "supervisor" not in str(header.render())

        # A supervisor job (supervise.where: job) starts and takes the run's lock.
        store = StateStore(demo_run.run.state_db)
        try:
            store.set_meta("supervisor_job", "9001")
            store.event("supervisor_job", "supervisor job 9001 started on cn09", job_id="9001", why="start")
        finally:
            store.close()
        lock = SupervisorLock(demo_run.run)
        lock.acquire()
        try:
            screen.refresh_now()
            await settle(pilot)
            assert header.view.supervisor == SupervisorJob("9001", SupervisorPhase.RUNNING)
            assert "supervisor job 9001 running" in str(header.render())
        finally:
            lock.release()
        # Killed without a word (scancel): started, and nobody holds the lock.
        screen.refresh_now()
        await settle(pilot)
        assert header.view.supervisor == SupervisorJob("9001", SupervisorPhase.LOST)
        assert "supervisor job 9001 lost" in str(header.render())


async def test_switching_runs_and_read_only(demo_run: DemoRun, runs_root: Path, settle) -> None:
    make_demo_run(runs_root, "zz-theirs", owner="someone-else")
    app = make_app(demo_run.run.root, clock=lambda: NOW)  # the demo run is owned by the current user
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        runs = screen.query_one(RunList)
        assert [run.name for run in runs.runs] == ["demo", "zz-theirs"]
        assert not screen.read_only and screen.check_action("cancel", ()) is True
        runs.focus()
        await pilot.press("down")
        await settle(pilot)
        assert screen.run is not None and screen.run.name == "zz-theirs"
        header = screen.query_one(RunHeader)
        assert screen.read_only and header.read_only and "READ-ONLY" in str(header.render())
        assert screen.check_action("cancel", ()) is None and screen.check_action("resubmit", ()) is None
        await pilot.press("c")
        await pilot.press("r")
        await pilot.pause()
        assert app.screen is screen  # no confirmation opened: nothing can be cancelled here
        await pilot.press("up")
        await settle(pilot)
        assert screen.run.name == "demo" and not screen.read_only


async def test_cancel_asks_then_kills_the_job_then_the_run(runs_root: Path, local_jobs: LocalJobs, settle) -> None:
    """No supervisor holds the run's lock: the TUI cancels through the executor, and the
    state database records the jobs as cancelled and which way the cancel went."""
    demo = make_demo_run(runs_root, live_ids=local_jobs.job_ids)
    app = make_app(demo.run.root, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        for _ in range(ROW_R1):
            await pilot.press("down")
        # escape on the modal cancels nothing
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.focused is not None and app.screen.focused.id == "back"
        await pilot.press("escape")
        await settle(pilot)
        assert all(local_jobs.alive(key) for key in local_jobs.job_ids)
        # the highlighted job only
        await pilot.press("c")
        await pilot.pause()
        await pilot.click("#choice-job")
        await settle(pilot)
        assert local_jobs.wait_ended("r1a1")
        assert local_jobs.alive("r0a1") and local_jobs.alive("r2a2")
        # the whole run
        await pilot.press("c")
        await pilot.pause()
        assert app.screen.query_one("#choice-run", Button)
        await pilot.click("#choice-run")
        await settle(pilot)
        for key in local_jobs.job_ids:
            assert local_jobs.wait_ended(key)
        assert demo.run.cancel_flag.exists()
        app.screen.refresh_now()
        await settle(pilot)
        timeline = app.screen.query_one(FailureTimeline)
        kinds = [str(timeline.get_row_at(i)[1]) for i in range(timeline.row_count)]
        assert kinds.count("cancel") == 2
    store = StateStore(demo.run.state_db, readonly=True)
    try:
        cancels = store.events(kind="cancel")
        jobs = {row.id: row for row in store.jobs()}
        train = store.stage("train")
    finally:
        store.close()
    assert [event.data["path"] for event in cancels] == ["executor", "executor"]
    assert [event.data["job_ids"] for event in cancels] == [
        [local_jobs.job_ids["r1a1"]],
        [local_jobs.job_ids["r0a1"], local_jobs.job_ids["r2a2"]],
    ]
    assert all(jobs[demo.rows[key]].state is JobState.CANCELLED for key in local_jobs.job_ids)
    assert train is not None and train.status is StageStatus.CANCELLED


async def test_resubmit_calls_the_action_after_confirmation(demo_run: DemoRun, monkeypatch, settle) -> None:
    calls = []
    monkeypatch.setattr(actions, "resubmit_failed", lambda run: calls.append(run) or "supervisor started")
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#choice-resubmit")
        await settle(pilot)
        assert [run.root for run in calls] == [demo_run.run.root]


async def test_help_and_quit(demo_run: DemoRun, settle) -> None:
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


async def test_runs_root_and_a_run_without_state(runs_root: Path, settle) -> None:
    from fm9g.rundir.config import RunConfig, dump

    fresh = runs_root / "fresh"
    fresh.mkdir(parents=True)
    (fresh / "config.yaml").write_text(dump(RunConfig()))
    app = make_app(runs_root, clock=lambda: NOW)  # a directory of runs: the first is selected
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        assert screen.run is not None and screen.run.name == "fresh"
        assert screen.view is not None and screen.view.status == "NEW"
        assert "no metrics yet" in str(screen.query_one(TrainingPanel).render())


async def test_refresh_writes_down_a_job_end_that_only_the_files_show(demo_run: DemoRun, settle) -> None:
    """The supervisor is gone (nobody holds the lock) and worker r1 ended: its exit record
    is in control/exits.  The TUI's refresh reconciles state.db before it shows it."""
    import time

    from fm9g.rundir.atomic import write_json

    ended = time.time()  # after the fixture's submission stamps (a record older than its job is a stale one)
    write_json(demo_run.run.exit_record(demo_run.job_ids["r1a1"]), {"code": 1, "time": ended, "node_rank": 1})
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(200, 60)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(JobTable)
        assert cell(table, f"job:{demo_run.rows['r1a1']}", "state").startswith("FAILED")
        timeline = app.screen.query_one(FailureTimeline)
        assert "reconciled" in [str(timeline.get_row_at(i)[1]) for i in range(timeline.row_count)]
    store = StateStore(demo_run.run.state_db, readonly=True)
    try:
        row = store.job(demo_run.rows["r1a1"])
    finally:
        store.close()
    assert row is not None and row.state is JobState.FAILED and row.exit_code == 1 and row.ended_at == ended


async def test_timeline_shows_an_inproc_recovery_and_its_later_phases(demo_run: DemoRun, settle) -> None:
    add_inproc_events(demo_run.run, "re_formed")
    app = make_app(demo_run.run.root, clock=lambda: NOW)
    async with app.run_test(size=(200, 60)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        assert screen.view is not None
        [recovery] = screen.view.inproc_recoveries
        assert not recovery.finished and recovery.generation_after == 2
        timeline = screen.query_one(FailureTimeline)
        rows = [timeline.get_row_at(i) for i in range(timeline.row_count)]
        # one row for the recovery; the routine membership events have none of their own
        assert [str(row[1]) for row in rows] == ["stage_end", "failure", "recovery", "inproc"]
        assert str(rows[-1][2]) == "r2" and "formed +1.5s" in str(rows[-1][3])
        add_inproc_events(demo_run.run, "first_step")
        screen.refresh_now()
        await settle(pilot)
        [recovery] = screen.view.inproc_recoveries
        assert recovery.finished and recovery.total_s == 4.0
        rows = [timeline.get_row_at(i) for i in range(timeline.row_count)]
        assert [str(row[1]) for row in rows] == ["stage_end", "failure", "recovery", "inproc"]  # rewritten in place
        assert "step +4.0s" in str(rows[-1][3])
