"""Submit and follow the one-job stages (convert, infer, serve) of a run: render the
stage's template, record the intent, submit, and poll the job into the state DB.

`StageContext` carries what every stage needs, passed explicitly (no module state).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fm9g.launchers.prompts import InferenceError
from fm9g.orchestrator.executors.base import UNKNOWN, Executor, JobStatus
from fm9g.orchestrator.jobs import JobTracker, UnknownTooLong
from fm9g.orchestrator.render import JobSpec, ScriptRenderer, config_hash
from fm9g.orchestrator.state import JobRow, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig

Say = Callable[[str], None]


@dataclass
class StageContext:
    """A run, its config, its state store and the tracker its stage jobs go through."""

    run: RunDir
    config: RunConfig
    store: StateStore
    executor: Executor
    say: Say
    python: str
    poll_interval: float = 1.0
    unknown_grace: float = 120.0  # seconds a job may stay UNKNOWN before a wait gives up on it

    def config_hash(self) -> str:
        try:
            return config_hash(self.run.config.read_text(encoding="utf-8"))
        except OSError:
            return "-"

    def renderer(self) -> ScriptRenderer:
        return ScriptRenderer(
            run_name=self.run.name,
            run_dir=str(self.run.root),
            cluster=self.config.cluster,
            python=self.python,
            config_hash=self.config_hash(),
        )

    def tracker(self) -> JobTracker:
        return JobTracker(self.run, self.store, self.executor, self.renderer(), requeue=self.config.cluster.requeue)


def stage_spec(stage: str, template: str, values: dict[str, Any]) -> JobSpec:
    """The one job of a post-training stage (convert, infer, serve)."""
    return JobSpec(stage=stage, role=stage, template=template, values=values)


def submit(ctx: StageContext, *, stage: str, template: str, values: dict[str, Any], why: str) -> JobRow:
    """Render `template` for the next attempt of `stage`, record it, submit it."""
    attempt = len(ctx.store.jobs(stage)) + 1
    row = ctx.tracker().submit(stage_spec(stage, template, values), attempt=attempt, why=why)
    ctx.say(f"submitted {stage} job {row.job_id} ({why}); log: {row.log}")
    return row


def adopt(ctx: StageContext, row: JobRow) -> None:
    """Let this process's executor see a job another fm9g-launch process submitted."""
    ctx.tracker().adopt([row])


def refresh(ctx: StageContext, row: JobRow) -> JobStatus:
    """Poll the stage's jobs and return `row`'s status now; UNKNOWN when the poll could not tell."""
    tracker = ctx.tracker()
    if tracker.poll(row.stage) is None:
        return UNKNOWN
    current = ctx.store.job(row.id)
    if current is None or row.id in tracker.unseen:
        return UNKNOWN
    return status_of(current)


def status_of(row: JobRow) -> JobStatus:
    """What the state DB last recorded for a job, as a poll result."""
    return JobStatus(
        row.state,
        exit_code=row.exit_code,
        node=row.node,
        reason=row.reason,
        restarts=row.restarts,
        started_at=row.started_at,
        ended_at=row.ended_at,
    )


class UnknownBound:
    """Bounds how long a job may stay UNKNOWN (failed polls, accounting lag) while we wait on it."""

    def __init__(self, ctx: StageContext, row: JobRow) -> None:
        self.ctx, self.row = ctx, row
        self.since: float | None = None

    def check(self, status: JobStatus) -> None:
        if status.state is not UNKNOWN.state:
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        if now - self.since > self.ctx.unknown_grace:
            raise InferenceError(
                f"job {self.row.job_id} has not been visible to the {self.ctx.executor.name} "
                f"executor for {self.ctx.unknown_grace:g}s; it may still exist: look for it "
                f"(squeue, or the process table), then run this command again"
            )


def wait(ctx: StageContext, row: JobRow) -> JobStatus:
    """Poll until the job has ended (COMPLETED, FAILED, CANCELLED, ...)."""
    try:
        [ended] = ctx.tracker().wait([row], interval=ctx.poll_interval, unknown_bound=ctx.unknown_grace)
    except UnknownTooLong as exc:
        raise InferenceError(str(exc)) from None
    return status_of(ended)


def open_context(
    run: RunDir, config: RunConfig, executor_kind: str, say: Say, python: str | None = None
) -> StageContext:
    """A StageContext on a fresh StateStore and executor; close its store when done."""
    from fm9g.orchestrator.executors import make_executor

    executor = make_executor(executor_kind)
    return StageContext(
        run=run,
        config=config,
        store=StateStore(run.state_db),
        executor=executor,
        say=say,
        python=python or config.cluster.python or sys.executable,
        poll_interval=executor.tick_interval(config.supervise.poll_interval),
    )
