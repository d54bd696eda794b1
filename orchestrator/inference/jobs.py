"""Submit and follow the one-job stages (convert, infer, serve) of a run: render the
stage's template, record the intent, submit, and poll the job into the state DB.

`StageContext` carries what every stage needs, passed explicitly (no module state).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fm9g.launchers.prompts import InferenceError
from fm9g.orchestrator.executors.base import Executor
from fm9g.orchestrator.jobs import JobTracker, UnknownTooLong
from fm9g.orchestrator.render import JobSpec, ScriptRenderer, config_hash
from fm9g.orchestrator.state import JobRow, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig

Say = Callable[[str], None]


@dataclass
class StageContext:
    """A run, its config, and the one tracker its stage jobs go through (built once:
    the script header's config hash is read when the context is made, not per poll)."""

    run: RunDir
    config: RunConfig
    tracker: JobTracker
    say: Say
    poll_interval: float = 1.0
    unknown_grace: float = 120.0  # seconds a job may stay UNKNOWN before a wait gives up on it

    @property
    def store(self) -> StateStore:
        return self.tracker.store

    @property
    def executor(self) -> Executor:
        return self.tracker.executor


def stage_context(
    run: RunDir, config: RunConfig, store: StateStore, executor: Executor, say: Say, python: str | None = None
) -> StageContext:
    """The context of `run`'s post-training stages on an open store and executor."""
    try:
        digest = config_hash(run.config.read_text(encoding="utf-8"))
    except OSError:
        digest = "-"
    renderer = ScriptRenderer(
        run_name=run.name,
        run_dir=str(run.root),
        cluster=config.cluster,
        python=python or config.cluster.python or sys.executable,
        config_hash=digest,
    )
    tracker = JobTracker(run, store, executor, renderer, requeue=config.cluster.requeue)
    return StageContext(run, config, tracker, say, poll_interval=executor.tick_interval(config.supervise.poll_interval))


def stage_spec(stage: str, template: str, values: dict[str, Any]) -> JobSpec:
    """The one job of a post-training stage (convert, infer, serve)."""
    return JobSpec(stage=stage, role=stage, template=template, values=values)


def submit(ctx: StageContext, *, stage: str, template: str, values: dict[str, Any], why: str) -> JobRow:
    """Render `template` for the next attempt of `stage`, record it, submit it."""
    spec = stage_spec(stage, template, values)
    row = ctx.tracker.submit(spec, attempt=ctx.tracker.next_attempt(stage), why=why)
    ctx.say(f"submitted {stage} job {row.job_id} ({why}); log: {row.log}")
    return row


def refresh(ctx: StageContext, stage: str) -> bool:
    """Poll `stage`'s live jobs once into state.db; False when the poll could not tell."""
    return ctx.tracker.poll(stage) is not None


def seen(ctx: StageContext, row: JobRow) -> JobRow | None:
    """`row` as the last poll left it; None when that poll could not see it (UNKNOWN)."""
    return None if row.id in ctx.tracker.unseen else ctx.store.job(row.id)


def wait(ctx: StageContext, row: JobRow) -> JobRow:
    """Poll until the job has ended (COMPLETED, FAILED, CANCELLED, ...); its final row."""
    with stop_on_interrupt(ctx, row):
        try:
            [ended] = ctx.tracker.wait([row], interval=ctx.poll_interval, unknown_bound=ctx.unknown_grace)
        except UnknownTooLong as exc:
            raise InferenceError(str(exc)) from None
    return ended


@contextmanager
def stop_on_interrupt(ctx: StageContext, row: JobRow) -> Iterator[None]:
    """Ctrl-C while a command follows its job.  A local job is a process this command
    started on this machine, so it is cancelled with the command; a Slurm job belongs to
    the cluster and keeps running, and the message names how to stop it.  Either way the
    KeyboardInterrupt goes on to the CLI, which exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        if ctx.executor.name == "local":
            ids = ctx.tracker.cancel([row], reason="interrupted (Ctrl-C)")
            ctx.store.event(
                "interrupt", f"Ctrl-C: cancelled {row.stage} job {row.job_id}", stage=row.stage, job_ids=ids
            )
            ctx.say(f"Ctrl-C: {row.stage} job {row.job_id} stopped")
        else:
            where = shlex.quote(str(ctx.run.root))
            ctx.store.event("interrupt", f"Ctrl-C: detached from {row.stage} job {row.job_id}", stage=row.stage)
            ctx.say(
                f"Ctrl-C: {row.stage} job {row.job_id} keeps running on the cluster; "
                f"`fm9g-launch cancel {where} --job {row.job_id}` stops it"
            )
        raise


def open_context(
    run: RunDir, config: RunConfig, executor_kind: str, say: Say, python: str | None = None
) -> StageContext:
    """A StageContext on a fresh StateStore and executor; close its store when done.
    `executor_kind` auto (a model folder's run) is made concrete here, once."""
    from fm9g.orchestrator.executors import make_executor

    store = StateStore(run.state_db)
    try:
        if executor_kind == "auto":
            from fm9g.orchestrator.executors import choose

            choice = choose.choose_auto()
            say(choice.describe())
            choose.record(store, choice)
            executor_kind = choice.kind
        config = keep_executor(run, config, executor_kind)
        return stage_context(run, config, store, make_executor(executor_kind), say, python)
    except BaseException:
        store.close()
        raise


def keep_executor(run: RunDir, config: RunConfig, kind: str) -> RunConfig:
    """A run whose config.yaml says auto (a model folder's) gets the executor of its first
    job written there, so `cancel` and `serve --stop` reach its jobs without probing again."""
    from fm9g.rundir import config as config_mod
    from fm9g.rundir.atomic import write_text

    try:
        raw = config_mod.read_file(run.config)
    except (OSError, config_mod.ConfigError):
        return config
    if not isinstance(raw, dict) or raw.get("executor") != "auto":
        return config
    raw["executor"] = kind
    write_text(run.config, config_mod.dump(config_mod.validate(raw, str(run.config))))
    return config.model_copy(update={"executor": kind})
