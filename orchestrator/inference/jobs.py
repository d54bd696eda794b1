"""Submit and follow the one-job stages (convert, infer, serve) of a run: render the
stage's template, record the intent, submit, and poll the job into the state DB.

`StageContext` carries what every stage needs, passed explicitly (no module state).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm9g.rundir.atomic import write_text
from fm9g.rundir.config import ClusterConfig, RunConfig
from fm9g.orchestrator.executors.base import UNKNOWN, Executor, JobStatus, PollError
from fm9g.orchestrator.render import config_hash, job_name, job_tag, render_template, sbatch_flags
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import TERMINAL_STATES, JobRow, JobState, StateStore

Say = Callable[[str], None]


@dataclass
class StageContext:
    """A run, its config, its state store and the executor its stage jobs go to."""

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


def render_stage(template: str, *, run_name: str, run_dir: str, stage: str, attempt: int, config_hash: str,
                 python: str, cluster: ClusterConfig, values: dict[str, Any]) -> str:
    """Script text of one stage job (pure: no I/O besides reading the template)."""
    tag = job_tag(run_name, stage, stage, 0, attempt)
    return render_template(template, run_name=run_name, run_dir=run_dir, stage=stage, attempt=attempt,
                           config_hash=config_hash, python=python, setup=cluster.setup,
                           sbatch_flags=sbatch_flags(cluster, name=job_name(run_name, stage, stage, 0), comment=tag),
                           **values)


def submit(ctx: StageContext, *, stage: str, template: str, values: dict[str, Any], why: str) -> JobRow:
    """Render `template` for the next attempt of `stage`, record it, submit it."""
    run, store = ctx.run, ctx.store
    attempt = len(store.jobs(stage)) + 1
    tag = job_tag(run.name, stage, stage, 0, attempt)
    text = render_stage(template, run_name=run.name, run_dir=str(run.root), stage=stage, attempt=attempt,
                        config_hash=ctx.config_hash(), python=ctx.python, cluster=ctx.config.cluster, values=values)
    script = run.scripts / f"{stage}-a{attempt}.sbatch"
    write_text(script, text, mode=0o755)
    log = run.stage_logs(stage) / f"{stage}-a{attempt}.out"
    row_id = store.record_intent(stage=stage, role=stage, node_rank=0, attempt=attempt, generation=0, tag=tag,
                                 script=str(script), script_hash=config_hash(text), log=str(log))
    job_id = ctx.executor.submit(script, log=log, tag=tag)
    store.mark_submitted(row_id, job_id)
    store.event("submitted", f"{stage} attempt {attempt} submitted as job {job_id} ({why})", stage=stage, job=row_id,
                job_id=job_id)
    ctx.say(f"submitted {stage} job {job_id} ({why}); log: {log}")
    row = store.job(row_id)
    assert row is not None
    return row


def adopt(ctx: StageContext, row: JobRow) -> None:
    """Let this process's executor see a job another fm9g-launch process submitted."""
    if row.job_id:
        ctx.executor.adopt(str(row.job_id), Path(row.log))


def refresh(ctx: StageContext, row: JobRow) -> JobStatus:
    """Poll one job and write what was seen into its row; a failed poll is UNKNOWN, never FAILED."""
    assert row.job_id is not None
    try:
        status = ctx.executor.poll([str(row.job_id)])[str(row.job_id)]
    except PollError:  # nothing is concluded from a failed poll
        return UNKNOWN
    if status.state is not JobState.UNKNOWN:
        fields: dict[str, Any] = {"state": status.state, "reason": status.reason}
        if status.node:
            fields["node"] = status.node
        if status.exit_code is not None:
            fields["exit_code"] = status.exit_code
        if status.started_at is not None:
            fields["started_at"] = status.started_at
        if status.ended_at is not None:
            fields["ended_at"] = status.ended_at
        ctx.store.update_job(row.id, **fields)
    return status


class Visibility:
    """Bounds how long a job may stay UNKNOWN (failed polls, accounting lag) while we wait on it."""

    def __init__(self, ctx: StageContext, row: JobRow) -> None:
        self.ctx, self.row = ctx, row
        self.since: float | None = None

    def check(self, status: JobStatus) -> None:
        if status.state is not JobState.UNKNOWN:
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since if self.since is not None else now
        if now - self.since > self.ctx.unknown_grace:
            from fm9g.launchers.prompts import InferenceError

            raise InferenceError(f"job {self.row.job_id} has not been visible to the {self.ctx.executor.name} "
                                 f"executor for {self.ctx.unknown_grace:g}s; it may still exist: look for it "
                                 f"(squeue, or the process table), then run this command again")


def wait(ctx: StageContext, row: JobRow) -> JobStatus:
    """Poll until the job has ended (COMPLETED, FAILED, CANCELLED, ...)."""
    visibility = Visibility(ctx, row)
    while True:
        status = refresh(ctx, row)
        if status.state in TERMINAL_STATES:
            return status
        visibility.check(status)
        time.sleep(ctx.poll_interval)


def log_tail(path: str | Path, lines: int = 15) -> str:
    """The last lines of a job log, indented, for an error message."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "  (no log yet)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


def open_context(run: RunDir, config: RunConfig, executor_kind: str, say: Say, python: str | None = None) -> StageContext:
    """A StageContext on a fresh StateStore and executor; close its store when done."""
    import sys

    from fm9g.orchestrator.executors import make_executor

    executor = make_executor(executor_kind)
    return StageContext(run=run, config=config, store=StateStore(run.state_db), executor=executor, say=say,
                        python=python or config.cluster.python or sys.executable,
                        poll_interval=executor.tick_interval(config.supervise.poll_interval))
