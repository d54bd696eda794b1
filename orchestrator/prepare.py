"""The stages before training, run as tracked jobs on either executor: index every raw
dataset of the mixture (all datasets at once: an array job over shards, then a merge
afterok of it), then train the tokenizer when the config names none.

Every job has a row in state.db, so `status`, the TUI, `cancel` and `resume` see them;
a supervisor that died mid-way re-adopts the live ones instead of submitting again.
Finished shards are skipped by the shard cache, so a re-run only redoes what failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from fm9g.orchestrator.jobs import JobTracker, UnknownTooLong, log_excerpt
from fm9g.orchestrator.plan import TOKENIZER, IndexSource, Plan, index_specs, tokenizer_spec
from fm9g.orchestrator.slurm.states import JobState
from fm9g.orchestrator.state import JobRow, StageStatus
from fm9g.rundir.atomic import read_json
from fm9g.rundir.config import ConfigError

Say = Callable[[str], None]


class StageFailed(ConfigError):
    """A data stage failed; the message names its logs and how to re-run."""


class StageCancelled(StageFailed):
    """The user cancelled the run (control/cancel) while a data stage ran."""


def submit_index(tracker: JobTracker, source: IndexSource, datasets_at_once: int) -> list[JobRow]:
    """Write the shard plan and submit the shard array and its merge."""
    from fm9g.data.index_plan import plan_shards

    plan_path = plan_shards(source.source, source.shards, source.work, output=source.output, language=source.language)
    assert plan_path == source.shard_plan, (plan_path, source.shard_plan)
    shards = len(read_json(plan_path)["shards"])
    shard, merge = index_specs(source, shards)
    attempt = tracker.next_attempt(shard.stage)
    array = tracker.submit(shard, attempt=attempt, why=f"{shards} shard(s)", jobs_at_once=datasets_at_once)
    assert array.job_id is not None
    merged = tracker.submit(merge, attempt=attempt, why="merge after the shards", after=[array.job_id])
    return [array, merged]


def run_data_stages(plan: Plan, tracker: JobTracker, say: Say, progress: bool = True) -> None:
    """Index every raw dataset, then train the tokenizer if one is planned; raises StageFailed."""
    store, config = tracker.store, plan.config
    interval = tracker.executor.tick_interval(config.supervise.poll_interval)
    rows: dict[str, list[JobRow]] = {}
    for source in plan.index_sources:
        stage = f"index:{source.task_name}"
        if (source.output / "meta.json").exists():  # finished while no supervisor watched
            store.set_stage(stage, StageStatus.COMPLETED, detail=f"indexed: {source.output}", progress=1.0)
            continue
        live = tracker.live_rows(stage)
        if live:
            say(f"{stage}: re-adopting its live jobs ({', '.join(str(row.job_id) for row in live)})")
            rows[stage] = live
        else:
            rows[stage] = submit_index(tracker, source, len(plan.index_sources))
            say(
                f"{stage}: shard array job {rows[stage][0].job_id}, merge job {rows[stage][-1].job_id}; "
                f"{source.source} -> {source.output}"
            )
        store.set_stage(stage, StageStatus.RUNNING, detail=f"{source.source} -> {source.output}")
    if rows:
        sources = {f"index:{s.task_name}": s for s in plan.index_sources}
        totals = {stage: shard_total(sources[stage]) for stage in rows}  # PLAN.json is fixed once written
        with shard_progress(progress, list(rows)) as show:

            def report() -> None:
                for stage in rows:
                    total = totals[stage]
                    done = shards_done(sources[stage], total)
                    store.set_stage_progress(
                        stage, done / total * 0.95 if total else 0.0, detail=f"{done}/{total} shards"
                    )
                    show(stage, done, total)

            finished = wait(tracker, [row for group in rows.values() for row in group], interval, report)
        failed = []
        for stage, group in rows.items():
            ids = {row.id for row in group}
            ended = [row for row in finished if row.id in ids]
            output = sources[stage].output
            if all(row.state is JobState.COMPLETED for row in ended) and (output / "meta.json").exists():
                meta = read_json(output / "meta.json") or {}
                store.set_stage(stage, StageStatus.COMPLETED, detail=f"{meta.get('nlines')} lines", progress=1.0)
                say(f"{stage}: indexed {meta.get('nlines')} lines into {output}")
            else:
                logs = tracker.run.stage_logs(stage)
                states = ", ".join(f"{row.role} job {row.job_id} {row.state.value}" for row in ended)
                reason = f"indexing {sources[stage].source} failed ({states}); see the logs in {logs}"
                store.set_stage(stage, StageStatus.FAILED, detail=reason)
                store.event("stage_end", f"{stage} failed: {reason}", stage=stage)
                failed.append(f"{stage}: {reason}\n{failure_excerpt(ended)}")
        if failed:
            raise StageFailed(
                "\n".join(failed) + "\nfix the data, then run the same command again (finished shards are kept)"
            )
    if any(stage.name == TOKENIZER and not stage.skip for stage in plan.stages):
        train_tokenizer(plan, tracker, say, interval)


def failure_excerpt(rows: list[JobRow]) -> str:
    """The end of the first failed job's log (an array's first failed task log on Slurm),
    so the reason shows without opening a file."""
    # A FAILED job holds the cause; a job cancelled for its dependency's failure does not.
    failed = next((row for row in rows if row.state is JobState.FAILED), None) or next(
        (row for row in rows if row.state is not JobState.COMPLETED), None
    )
    if failed is None:
        return ""
    log = Path(failed.log)
    tasks = sorted(log.parent.glob(f"{log.stem}-*{log.suffix}"))  # Slurm arrays: one log per task
    for path in [log, *tasks]:
        if path.exists() and path.stat().st_size:
            return f"  {path}:\n{log_excerpt(path, lines=5)}"
    return ""


def train_tokenizer(plan: Plan, tracker: JobTracker, say: Say, interval: float) -> None:
    store, run = tracker.store, tracker.run
    target = run.tokenizer_dir / "tokenizer.model"
    if target.exists():
        store.set_stage(TOKENIZER, StageStatus.COMPLETED, detail=str(target), progress=1.0)
        return
    live = tracker.live_rows(TOKENIZER)
    if live:
        row = live[0]
    else:
        row = tracker.submit(
            tokenizer_spec(run, plan.config.data.tokenizer_vocab_size),
            attempt=tracker.next_attempt(TOKENIZER),
            why="no data.tokenizer_path",
        )
        say(f"tokenizer: training sentencepiece (vocab {plan.config.data.tokenizer_vocab_size}) as job {row.job_id}")
    store.set_stage(TOKENIZER, StageStatus.RUNNING)
    [ended] = wait(tracker, [row], interval, None)
    if ended.state is JobState.COMPLETED and target.exists():
        store.set_stage(TOKENIZER, StageStatus.COMPLETED, detail=str(target), progress=1.0)
        return
    reason = f"tokenizer job {ended.job_id} ended {ended.state.value} (exit code {ended.exit_code}); see {ended.log}"
    store.set_stage(TOKENIZER, StageStatus.FAILED, detail=reason)
    store.event("stage_end", f"tokenizer failed: {reason}", stage=TOKENIZER)
    raise StageFailed(reason + "; or give one with data.tokenizer_path")


def wait(tracker: JobTracker, rows: list[JobRow], interval: float, report: Callable[[], None] | None) -> list[JobRow]:
    """Follow `rows` to their end; a raised cancel flag cancels them and raises StageCancelled."""

    def tick() -> None:
        if report is not None:
            report()
        if tracker.run.cancel_flag.exists():
            current = [row for row in (tracker.store.job(r.id) for r in rows) if row is not None]
            ids = tracker.cancel(current, reason="cancelled by the user")
            for stage in sorted({row.stage for row in current}):
                tracker.store.set_stage(stage, StageStatus.CANCELLED, detail="cancelled by the user")
                tracker.store.event("stage_end", f"{stage} cancelled by the user", stage=stage, job_ids=ids)
            raise StageCancelled(
                f"cancelled by the user: {' '.join(ids) or 'no live jobs'}; "
                "run the same command again to continue (finished shards are kept)"
            )

    try:
        return tracker.wait(rows, interval=interval, on_tick=tick)
    except UnknownTooLong as exc:
        raise StageFailed(str(exc)) from None


def shard_total(source: IndexSource) -> int:
    """How many shard tasks the dataset's PLAN.json holds."""
    return len((read_json(source.shard_plan) or {}).get("shards", []))


def shards_done(source: IndexSource, total: int) -> int:
    """Shard tasks that wrote their result so far."""
    shards = source.work / "shards"
    return min(total, len(list(shards.glob("*/result.json")))) if shards.exists() else 0


@contextlib.contextmanager
def shard_progress(enabled: bool, stages: list[str]) -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar per index stage (shards done), or a silent callback (detached, tests)."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards"),
        TimeElapsedColumn(),
    ) as bar:
        tasks = {stage: bar.add_task(stage, total=None) for stage in stages}

        def show(stage: str, done: int, total: int) -> None:
            bar.update(tasks[stage], completed=done, total=total or None)

        yield show
