"""`MainScreen`: runs, the selected run's training progress, jobs, log and failure
timeline.

Data flows one way.  A timer starts one refresh worker at a time (a thread: sqlite and
file reads block); the worker reads the run directory into a `RunView` and the new log
text, then hands them to the event loop, which sets them on the widgets.  Widgets post
messages up (a run or a job highlighted, the filter closed) and the screen decides.
Actions (cancel, resubmit) go through `fm9g.orchestrator.actions`, exactly like the CLI.
Every read goes through `fm9g.orchestrator.views` (the same reader as `status`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input

from fm9g.orchestrator import actions
from fm9g.orchestrator.state import JobRow
from fm9g.orchestrator.tui.logtail import LogChunk, LogFollower
from fm9g.orchestrator.tui.screens.confirm import Choice, ConfirmScreen
from fm9g.orchestrator.tui.widgets.failure_timeline import FailureTimeline
from fm9g.orchestrator.tui.widgets.filter_bar import FilterBar
from fm9g.orchestrator.tui.widgets.job_table import JobTable
from fm9g.orchestrator.tui.widgets.log_pane import LogPane
from fm9g.orchestrator.tui.widgets.run_header import RunHeader
from fm9g.orchestrator.tui.widgets.run_list import RunList
from fm9g.orchestrator.tui.widgets.training_panel import TrainingPanel
from fm9g.orchestrator.views import RunReader, RunSummary, RunView, list_runs
from fm9g.rundir import RunDir

CATALOG_EVERY_S = 5.0


@dataclass(frozen=True)
class Refresh:
    """What one refresh worker read, handed to the event loop as one value."""

    reader: RunReader | None
    view: RunView | None
    runs: tuple[RunSummary, ...] | None
    log_path: Path | None
    log: LogChunk | None
    error: str = ""


class MainScreen(Screen[None]):
    BINDINGS = [
        Binding("l", "logs", "Logs"),
        Binding("t", "timeline", "Failures"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "resubmit", "Resubmit"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(
        self, runs_root: Path, selected: Path | None, *, user: str, interval: float, clock: Callable[[], float]
    ) -> None:
        super().__init__()
        self.runs_root = runs_root
        self.user = user
        self.interval = interval
        self.clock = clock
        self.run: RunDir | None = RunDir.of(selected) if selected else None
        self.reader: RunReader | None = RunReader(self.run, clock) if self.run else None
        self.view: RunView | None = None
        self.read_only = False
        self.log_path: Path | None = None
        self._follower: LogFollower | None = None  # touched by the refresh worker only
        self._busy = False
        self._again = False
        self._ticks = 0
        self._last_error = ""
        self._catalog_every = max(1, round(CATALOG_EVERY_S / interval))

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with Horizontal(id="top"):
            yield RunList(selected=self.run.root if self.run else None, id="runs")
            yield TrainingPanel(id="training")
        yield JobTable(id="jobs")
        with Horizontal(id="lower", classes="-show-log"):
            yield LogPane(id="log")
            yield FailureTimeline(id="timeline")
        yield FilterBar(id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#runs").border_title = "runs"
        self.query_one("#training").border_title = "training"
        self.query_one("#jobs").border_title = "jobs"
        self.query_one("#timeline").border_title = "failures"
        self.query_one(LogPane).border_title = "log"
        self.query_one(JobTable).focus()
        self.set_interval(self.interval, self.tick)
        self.tick()

    # ------------------------------------------------------------------ refresh
    def tick(self) -> None:
        """Start a refresh unless one is running (then run another right after it)."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        catalog = self._ticks % self._catalog_every == 0
        self._ticks += 1
        self.load(self.reader, self.log_path, catalog)

    @work(thread=True, exit_on_error=False, group="refresh")
    def load(self, reader: RunReader | None, log_path: Path | None, catalog: bool) -> None:
        """Read the run directory off the event loop; hand the result back to it."""
        try:
            runs = tuple(list_runs(self.runs_root)) if catalog else None
            view = reader.load() if reader else None
            chunk = self.poll_log(log_path)
            result = Refresh(reader, view, runs, log_path, chunk)
        except Exception as exc:  # a viewer keeps going: show why, try again next tick
            result = Refresh(reader, None, None, log_path, None, error=f"{type(exc).__name__}: {exc}")
        try:
            self.app.call_from_thread(self.apply, result)
        except RuntimeError:  # the app is shutting down
            pass

    def poll_log(self, path: Path | None) -> LogChunk | None:
        if self._follower is not None and self._follower.path != path:
            self._follower.close()
            self._follower = None
        if path is None:
            return None
        if self._follower is None:
            self._follower = LogFollower(path)
        return self._follower.poll()

    def apply(self, result: Refresh) -> None:
        """Set what the worker read on the widgets (event loop)."""
        self._busy = False
        if result.error and result.error != self._last_error:  # say it once, not every tick
            self.notify(result.error, title="refresh failed", severity="error", timeout=6)
        self._last_error = result.error
        if result.runs is not None:
            self.query_one(RunList).runs = result.runs
        if result.view is not None and result.reader is self.reader:
            self.show_view(result.view)
        if result.log is not None and result.log_path == self.log_path:
            self.query_one(LogPane).add(result.log)
        if self._again:
            self._again = False
            self.tick()

    def show_view(self, view: RunView) -> None:
        self.view = view
        read_only = bool(view.owner) and view.owner != self.user
        if read_only != self.read_only:
            self.read_only = read_only
            self.refresh_bindings()
            if read_only:
                self.notify(
                    f"{view.run.name} belongs to {view.owner}: read-only, cancel and resubmit are off",
                    title="read-only",
                    timeout=6,
                )
        header = self.query_one(RunHeader)
        header.read_only = read_only
        header.view = view
        self.query_one(TrainingPanel).metrics = view.metrics
        self.query_one(JobTable).view = view
        if view.events:
            self.query_one(FailureTimeline).append(view.events, {job.id: job for job in view.jobs})
        if view.inproc_recoveries:
            self.query_one(FailureTimeline).show_inproc(view.inproc_recoveries)

    def refresh_now(self) -> None:
        """Refresh at once (tests, and after an action)."""
        self.tick()

    # ------------------------------------------------------------------ messages from widgets
    @on(RunList.RunSelected)
    def select_run(self, event: RunList.RunSelected) -> None:
        if self.run is not None and event.path == self.run.root:
            return
        self.run = RunDir.of(event.path)
        self.reader = RunReader(self.run, self.clock)
        self.view = None
        self.read_only = False
        self.refresh_bindings()
        self.query_one(FailureTimeline).reset()
        self.query_one(JobTable).view = None
        self.query_one(TrainingPanel).metrics = None
        self.follow_log(None)
        self.tick()

    @on(JobTable.JobHighlighted)
    def job_highlighted(self, event: JobTable.JobHighlighted) -> None:
        job = event.job or self.stage_job(event.stage)
        self.follow_log(job)

    def stage_job(self, stage: str | None) -> JobRow | None:
        """The job whose log a stage row shows: its newest master, else its newest job."""
        if self.view is None or stage is None:
            return None
        jobs = [job for job in self.view.jobs if job.stage == stage]
        masters = [job for job in jobs if job.node_rank == 0]
        return max(masters or jobs, key=lambda job: (job.attempt, job.id), default=None)

    def follow_log(self, job: JobRow | None) -> None:
        path = None
        if job is not None and job.log and self.run is not None:
            path = Path(job.log) if Path(job.log).is_absolute() else self.run.root / job.log
        label = "-"
        if job is not None:
            label = f"{job.stage} r{job.node_rank} {job.role} a{job.attempt} · job {job.job_id or '-'}"
        pane = self.query_one(LogPane)
        if path == self.log_path and pane.border_title == f"log · {label}":
            return  # the same job (this message comes after every table update)
        self.log_path = path
        pane.follow(path, label)
        if path is not None:
            self.tick()

    @on(FilterBar.Closed)
    def filter_closed(self, event: FilterBar.Closed) -> None:
        self.query_one(JobTable).focus()
        self.set_filter(self.query_one(FilterBar).value)

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.set_filter(event.value)

    def set_filter(self, text: str) -> None:
        table = self.query_one(JobTable)
        table.filter_text = text
        table.border_title = f"jobs · filter: {text}" if text else "jobs"

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("cancel", "resubmit") and (self.read_only or self.run is None):
            return None  # shown, greyed out
        return True

    def action_logs(self) -> None:
        """Show the log pane; pressed again, the log takes the whole screen (esc: back)."""
        lower = self.query_one("#lower")
        log = self.query_one(LogPane)
        narrow = self.has_class("-narrow")
        if self.maximized is log:
            self.minimize()
        elif lower.has_class("-show-log") and (log.has_focus or narrow):
            self.maximize(log, container=False)
            log.focus()
        elif not narrow:
            log.focus()  # wide: the log is already on screen
        lower.set_class(True, "-show-log")
        lower.set_class(False, "-show-timeline")

    def action_timeline(self) -> None:
        if self.maximized is not None:
            self.minimize()
        lower = self.query_one("#lower")
        lower.set_class(False, "-show-log")
        lower.set_class(True, "-show-timeline")

    def action_filter(self) -> None:
        self.query_one(FilterBar).open()

    def action_clear_filter(self) -> None:
        if self.maximized is not None:
            self.minimize()
            return
        self.query_one(FilterBar).value = ""
        self.set_filter("")

    def action_cancel(self) -> None:
        run = self.run
        if run is None or self.read_only:
            return
        line = self.query_one(JobTable).current_line()
        job = line.job if line is not None else None
        live_jobs = [j for j in (self.view.jobs if self.view else ()) if j.live and j.job_id]
        if not live_jobs:
            self.notify(f"{run.name} has no live jobs to cancel")
            return
        choices = []
        if job is not None and job.live and job.job_id:
            choices.append(Choice("job", f"Cancel job {job.job_id}", "warning"))
        choices.append(Choice("run", "Cancel the run", "error"))
        target = (
            f"\n\nHighlighted: {job.stage} r{job.node_rank} {job.role}, job {job.job_id} ({job.state.value})."
            if job is not None
            else ""
        )
        question = (
            f"Cancel in run [b]{run.name}[/b]?  {len(live_jobs)} live job(s).{target}\n"
            "The run: its supervisor cancels the jobs (through control/cancel) and does not resubmit "
            "them; with no supervisor running, this cancels them itself.  One job: cancelled here, "
            "and a running supervisor replaces it like a lost node."
        )

        def decided(choice: str | None) -> None:  # a Choice id: "job", "run", or None for back
            if choice == "job" and job is not None:
                self.do_cancel(run, job.job_id)
            elif choice == "run":
                self.do_cancel(run, None)

        self.app.push_screen(ConfirmScreen(question, choices), decided)

    @work(thread=True, exit_on_error=False, group="action")
    def do_cancel(self, run: RunDir, job_id: str | None) -> None:
        try:
            message, severity = actions.cancel_run(run, job_id=job_id).describe(), "information"
        except Exception as exc:
            message, severity = f"cancel failed: {exc}", "error"
        self.app.call_from_thread(self.notify, message, severity=severity)
        self.app.call_from_thread(self.tick)

    def action_resubmit(self) -> None:
        run = self.run
        if run is None or self.read_only:
            return
        question = (
            f"Resubmit the failed nodes of [b]{run.name}[/b]?\n\n"
            "This starts a detached supervisor (fm9g-launch resume --detach): it re-adopts the live "
            "jobs and submits the missing ones."
        )

        def decided(choice: str | None) -> None:
            if choice == "resubmit":
                self.do_resubmit(run)

        self.app.push_screen(ConfirmScreen(question, [Choice("resubmit", "Resubmit", "warning")]), decided)

    @work(thread=True, exit_on_error=False, group="action")
    def do_resubmit(self, run: RunDir) -> None:
        try:
            output = actions.resubmit_failed(run)
            message, severity = output or "resubmitting: a supervisor was started", "information"
        except Exception as exc:
            message, severity = f"resubmit failed: {exc}", "error"
        self.app.call_from_thread(self.notify, message, severity=severity)
        self.app.call_from_thread(self.tick)
