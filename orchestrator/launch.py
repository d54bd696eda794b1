"""`pretrain` / `sft` / `resume`: validate a config into a plan, take the run's lock,
write the run directory, and supervise the plan's stages to the end.

Order matters, and is the same for every command that touches a run:
    validate + plan (writes nothing) -> lock -> write -> supervise.
A refused command (a bad config, a run another supervisor holds) leaves the run
directory byte for byte as it was; a dry run writes only under runs/<name>/dry-run/.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fm9g.orchestrator.executors.choose import ExecutorChoice, Kind
from fm9g.orchestrator.plan import TRAIN, Plan, plan_run
from fm9g.orchestrator.state import StageStatus, StateStore
from fm9g.orchestrator.tui.format import format_node_seconds
from fm9g.orchestrator.waiting import run_waiting
from fm9g.rundir import RunDir
from fm9g.rundir import config as config_mod
from fm9g.rundir import site as site_mod
from fm9g.rundir.atomic import read_json, write_json, write_text
from fm9g.rundir.config import ConfigError, RunConfig


class LaunchError(RuntimeError):
    """The run cannot start; the message says why and what to do."""


@dataclass
class LaunchOptions:
    config_path: Path | None
    overrides: list[str]
    nodes: int | None = None
    executor: str | None = None
    name: str | None = None
    dry_run: bool = False
    detach: bool = False
    sft: bool = False
    progress: bool = True
    yes: bool = False  # run a local multi-node run next to a live Slurm without asking


def say(message: str) -> None:
    print(f"fm9g-launch: {message}", flush=True)


def resolve_config(options: LaunchOptions) -> tuple[RunConfig, str, str]:
    """(config, run name, the plan's line naming the site file applied): the run config
    over the site defaults (fm9g.rundir.site), then --set and the command's own options."""
    if options.nodes is not None and options.nodes < 1:
        raise ConfigError(f"--nodes {options.nodes}: a run needs at least one node")
    overrides = list(options.overrides)
    if options.nodes is not None:
        overrides.append(f"cluster.nodes={options.nodes}")
    if options.executor is not None:
        overrides.append(f"executor={options.executor}")
    if options.sft:
        overrides.append("data.sft=true")
    layered = site_mod.load(options.config_path, overrides)
    name = options.name or layered.name
    check_run_name(name)
    return layered.config, name, layered.site_note


def settle_executor(config: RunConfig, run: RunDir, options: LaunchOptions) -> tuple[RunConfig, ExecutorChoice]:
    """The config with a concrete executor, and why it is that one.  `auto` probes Slurm,
    unless the run exists: then it keeps the executor its jobs were started with."""
    from fm9g.orchestrator.executors import choose

    requested = config.executor
    if requested == "auto":
        kept = _run_executor(run)
        if kept is not None:
            choice = ExecutorChoice(kept, f"run {run.name} was started with it (its config.yaml)")
        else:
            choice = choose.choose_auto()
    else:
        named = f"--executor {requested}" if options.executor else f"executor: {requested} (config, site file or --set)"
        choice = ExecutorChoice(requested, f"named by {named}", requested=requested)
    return config.model_copy(update={"executor": choice.kind}), choice


def _run_executor(run: RunDir) -> Kind | None:
    """The concrete executor an existing run's config.yaml names; None for a new run."""
    try:
        kind = config_mod.read_file(run.config).get("executor")
    except (OSError, ConfigError, AttributeError):
        return None
    return kind if kind in ("local", "slurm") else None


def confirm_local(choice: ExecutorChoice, nodes: int, yes: bool) -> ExecutorChoice:
    """Local named with several nodes where Slurm answers needs a yes (a terminal's, or
    --yes): on a login node it would run every node's trainers there.  `choice` as
    confirmed; a LaunchError when refused.  Slurm is probed only in that case."""
    from dataclasses import replace

    from fm9g.orchestrator.executors.choose import probe_slurm

    if nodes < 2:
        return choice
    if choice.requested == "auto" and choice.kind == "local" and choice.slurm_silent:
        # A login node whose controller is down for a moment must not quietly become
        # the training machine.
        what = (
            f"auto picked this machine for all {nodes} nodes' trainers because Slurm is installed here "
            f"but does not answer ({choice.why})"
        )
        instead = "or wait until `scontrol ping` answers and run the same command again"
    elif choice.requested == "local":
        probe = probe_slurm()
        if not probe.answers:
            return choice
        what = f"executor local runs all {nodes} nodes' trainers on this machine, but Slurm answers here ({probe.why})"
        instead = "or drop `--executor local` (auto picks Slurm here) or pass `--executor slurm` to submit them"
    else:
        return choice
    if yes:
        return replace(choice, confirmed="--yes")
    if not sys.stdin.isatty():
        raise LaunchError(f"not started: {what}; pass --yes to run them here anyway, {instead}")
    try:
        answer = input(f"fm9g-launch: {what}. Run them here? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise LaunchError("not started; `--executor slurm` (or no --executor: auto) submits the run to Slurm")
    return replace(choice, confirmed="terminal")


def record_choice(run: RunDir, choice: ExecutorChoice) -> None:
    """The executor choice as an `executor_choice` event in the run's state.db."""
    from fm9g.orchestrator.executors import choose

    store = open_store(run)
    try:
        choose.record(store, choice)
    finally:
        store.close()


def check_run_name(name: str) -> None:
    """A run name becomes one directory under run_root: no '/', no '..', nothing hidden."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith((".", "-")):
        raise ConfigError(
            f"run name {name!r} cannot be a directory name under runs/: use letters, digits, "
            f"'-', '_' or '.' (no '/', not starting with '.' or '-'), via --name or train.model_unique"
        )


class SupervisorLock:
    """One supervisor per run directory: an flock held for the supervisor's lifetime."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.lock
        self.handle: IO[str] | None = None

    # A viewer (`status`, the TUI) holds the lock for a few milliseconds while it writes
    # down job ends no supervisor saw; a supervisor holds it for good.  Waiting this long
    # tells the two apart, so a `resume` next to a `status` is not refused.
    VIEWER_GRACE_S = 2.0

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        deadline = time.monotonic() + self.VIEWER_GRACE_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LaunchError(
                f"a supervisor ({holder}) already runs for {self.path.parent}; "
                f"watch it with `fm9g-launch status {self.path.parent}`"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _loss(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def describe_summary(run: RunDir, prompts: str | None = None) -> str:
    """The finished run's figures, ending with the model's answer to the first prompts of
    `prompts` (pipeline.eval_prompts) when the model is small enough to sample here."""
    summary = read_json(run.summary) or {}
    lines = [f"run {run.name} is complete"]
    if summary:
        lines.append(
            f"  steps run:    {summary.get('steps_run')} (step {summary.get('start_step')} -> {summary.get('final_step')})"
        )
        lines.append(f"  loss:         {_loss(summary.get('first_loss'))} -> {_loss(summary.get('last_loss'))}")
        lines.append(f"  checkpoint:   {summary.get('checkpoint')}")
        lines.append(
            f"  tensorboard:  {summary.get('tensorboard')}   (tensorboard --logdir {shlex.quote(str(run.tensorboard))})"
        )
    waiting = run_waiting(run, time.time())
    if waiting is not None:
        lines.append(f"  waiting:      {format_node_seconds(waiting)} holding nodes while others queued")
    lines.append(f"  run dir:      {run.root}")
    lines.extend(describe_samples(run, prompts))
    return "\n".join(lines)


def describe_samples(run: RunDir, prompts: str | None) -> list[str]:
    """Summary lines with greedy generations from the latest checkpoint (best effort: a
    failure is one line saying why, never the run's failure)."""
    step = run.latest_step()
    if prompts is None or step is None:
        return []
    from fm9g.orchestrator.samples import summary_samples

    try:
        samples = summary_samples(run.checkpoints / str(step), Path(prompts))
    except Exception as exc:  # noqa: BLE001 - the run is complete whatever sampling says
        return [f"  generations:  none ({type(exc).__name__}: {exc})"]
    if not samples:
        return []
    lines = [f"  generations (step {step}, greedy; more with `fm9g-launch infer {shlex.quote(str(run.root))}`):"]
    lines.extend(f"    {sample.prompt!r} -> {sample.completion!r}" for sample in samples)
    return lines


def greeting(run: RunDir, existed: bool) -> str:
    if not existed:
        return f"new run {run.name} in {run.root}"
    step = run.latest_step()
    if step is not None and not (run.checkpoints / str(step)).is_dir():
        return (
            f"resuming run {run.name} in {run.root}: checkpoints/latest names step {step}, which is missing; "
            f"the trainer starts from the newest complete checkpoint it finds"
        )
    return f"resuming run {run.name} in {run.root}" + (f" from checkpoint step {step}" if step is not None else "")


def launch(options: LaunchOptions) -> int:
    config, name, site_note = resolve_config(options)
    run = RunDir.of(Path(config.run_root) / name)
    config, choice = settle_executor(config, run, options)  # config.yaml then names local or slurm
    if choice.requested == "auto":
        say(choice.describe())
    warnings = preflight(config)
    plan = plan_run(config, run)  # validates everything a real run does; writes nothing
    for warning in warnings:
        say(f"warning: {warning}")
    if config.supervise.where == "job":
        from fm9g.orchestrator import supervisor_job

        supervisor_job.check(config)  # before anything is written
    if options.dry_run:
        return write_dry_run(plan, site_note)
    if run.done_flag.exists() and not config.pipeline.after_train:
        from fm9g.orchestrator.reconcile import reconcile_run

        reconcile_run(run)  # jobs that ended while nobody watched stop showing RUNNING
        say(describe_summary(run, config.pipeline.eval_prompts))
        say("nothing to do; give the run a new name (--name or train.model_unique) to train again")
        return 0
    choice = confirm_local(choice, config.cluster.nodes, options.yes)  # after validation: errors first
    existed = run.config.exists()
    lock = SupervisorLock(run)
    lock.acquire()  # before any write: a refused command changes nothing
    try:
        run.make()
        write_text(run.config, plan.config_text)
        record_choice(run, choice)
        if not site_note.startswith("site defaults: none"):  # said only when a site file applied
            say(site_note)  # config.yaml holds the resolved values: the site file is not read again
        if options.detach:
            lock.release()  # the background supervisor takes it again
            return detach(run)
        if config.supervise.where == "job":
            lock.release()  # the supervisor job takes it again
            return supervisor_job.launch_job(config, run)
        say(greeting(run, existed))
        return supervise(plan, progress=options.progress)
    finally:
        lock.release()


def resume(run: RunDir, *, detach_it: bool, progress: bool) -> int:
    """Supervise an existing run from its config.yaml: re-adopt live jobs, submit what is missing."""
    lock = SupervisorLock(run)
    lock.acquire()
    try:
        # The run's own resolved config, never the site file: it may have changed since.
        config = config_mod.load_resolved(run.config)
        if config.executor == "auto":  # launch writes local or slurm; a hand edit can leave auto
            raise ConfigError(
                f"{run.config}: executor: auto, but a run's config.yaml names the executor its jobs "
                f"were started with: set `executor: local` or `executor: slurm` there"
            )
        for warning in preflight(config):
            say(f"warning: {warning}")
        plan = plan_run(config, run)
        if detach_it:
            lock.release()
            return detach(run)
        say(greeting(run, existed=True))
        return supervise(plan, progress=progress)
    finally:
        lock.release()


def write_dry_run(plan: Plan, site_note: str = "") -> int:
    """Print the plan and write its config and scripts under runs/<name>/dry-run/ (nothing
    the run reads): the same bytes a real run of this config submits first."""
    out = plan.run.dry_run
    listing = plan.describe() + (f"  {site_note}\n" if site_note else "")
    write_text(out / "config.yaml", plan.config_text)
    write_text(out / "plan.txt", listing)
    for name, text in plan.scripts.items():
        write_text(out / "scripts" / name, text, mode=0o755)
    print(listing, end="")
    say(f"dry run: {len(plan.scripts)} script(s) and the resolved config in {out} (nothing submitted)")
    return 0


def detach(run: RunDir) -> int:
    """Start the supervisor in the background and return; it writes supervisor.log."""
    log = run.supervisor_log
    with open(log, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "fm9g.orchestrator.cli", "resume", str(run.root), "--no-progress"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    say(f"supervisor started in the background (pid {child.pid}); log: {log}")
    say(
        f"watch it: fm9g-launch status {shlex.quote(str(run.root))}   or   fm9g-launch tui {shlex.quote(str(run.root))}"
    )
    return 0


def preflight(config: RunConfig) -> list[str]:
    """Checks against the cluster before anything waits in the queue (Slurm only).  It
    drops excluded nodes the cluster does not know from the config (sbatch would refuse)."""
    if config.executor != "slurm":
        return []
    from fm9g.orchestrator.slurm import preflight as slurm_preflight

    try:
        return slurm_preflight.check_run(config)
    except slurm_preflight.PreflightError as exc:
        raise ConfigError(f"not submitted: {exc}") from None


def open_store(run: RunDir) -> StateStore:
    """The run's state.db for writing; an unreadable one is an error that says what to do."""
    import sqlite3

    try:
        store = StateStore(run.state_db)
        store.stages()
        return store
    except sqlite3.DatabaseError as exc:
        if disk_full(exc):
            raise
        raise LaunchError(
            f"{run.state_db} cannot be read ({exc}); the jobs it tracked may still run: cancel them "
            f"(`squeue --name` shows them as fm9g-{run.name}-*), move the file aside "
            f"(mv {shlex.quote(str(run.state_db))} {shlex.quote(str(run.state_db) + '.broken')}), then run "
            f"`fm9g-launch resume {shlex.quote(str(run.root))}`: finished indexes, the tokenizer and the "
            f"checkpoints are found again in the run directory"
        ) from None


class DiskFull(LaunchError):
    """The run directory's filesystem filled up under the supervisor."""


def disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT from a write, or SQLite's own word for it (SQLITE_FULL)."""
    import sqlite3

    from fm9g.rundir.atomic import is_no_space

    return is_no_space(error) or (isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error))


def supervise(plan: Plan, progress: bool = True) -> int:
    """Run the plan's stages to their end; a full disk ends it with a recorded failure
    naming the filesystem, never a traceback (`resume` continues once space is freed)."""
    from fm9g.rundir.atomic import no_space_reason

    try:
        return _supervise(plan, progress)
    except KeyboardInterrupt:
        from fm9g.orchestrator.interrupt import detach_on_interrupt, stop_on_interrupt

        # Local jobs are this machine's processes: Ctrl-C stops them.  Slurm's run on: detach.
        if plan.config.executor == "local":
            return stop_on_interrupt(plan, say)
        return detach_on_interrupt(plan, say)
    except Exception as exc:  # only a full disk is handled here; everything else re-raises
        if not disk_full(exc):
            raise
        reason = no_space_reason(plan.run.root, f"`fm9g-launch resume {shlex.quote(str(plan.run.root))}` continues")
        _record_failure(plan.run, reason)
        raise DiskFull(reason) from None


def _record_failure(run: RunDir, reason: str) -> None:
    """Best effort on a full disk: SQLite may still find a page for one row."""
    try:
        store = StateStore(run.state_db)
        try:
            for stage in store.stages():
                if stage.status is StageStatus.RUNNING:
                    store.set_stage(stage.name, StageStatus.FAILED, detail=reason)
            store.event("disk_full", reason)
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - nothing more can be written; the message still reaches the user
        pass


def _supervise(plan: Plan, progress: bool) -> int:
    """Run the plan's stages to their end: data stages, training, then post-training."""
    from fm9g.orchestrator.executors import make_executor
    from fm9g.orchestrator.jobs import JobTracker
    from fm9g.orchestrator.prepare import run_data_stages
    from fm9g.orchestrator.train_policy import TrainPolicy

    run, config = plan.run, plan.config
    store = open_store(run)
    from fm9g.orchestrator.reconcile import reconcile

    for change in reconcile(run, store, holding_lock=True):  # what the jobs did while nobody watched
        say(f"caught up: {change}")
    store.set_meta("owner", getpass.getuser())
    store.set_meta("executor", config.executor)
    store.set_meta("nodes", config.cluster.nodes)
    if store.meta("created_at") is None:
        store.set_meta("created_at", time.time())
    started = time.time()
    try:
        executor = make_executor(config.executor, since=store.meta("created_at"))
        tracker = JobTracker(run, store, executor, plan.renderer(), requeue=config.cluster.requeue)
        tracker.adopt()
        # A cancel flag left by an earlier cancel would stop this run at once: starting
        # a supervisor again is the user's word that the run should go on.
        run.cancel_flag.unlink(missing_ok=True)
        for stage in plan.stages:
            store.upsert_stage(stage.name, stage.kind.value, list(stage.depends_on))
            current = store.stage(stage.name)
            if stage.skip and current is not None and current.status is StageStatus.PENDING:
                store.set_stage(stage.name, StageStatus.SKIPPED, detail=stage.skip)
        write_json(run.mixture, plan.mixture)
        run_data_stages(plan, tracker, say, progress=progress)
        supervisor = TrainPolicy(run, config, store, tracker, say=say)
        # A finished training stage is not run again (post-training stages may still be due).
        if run.done_flag.exists():
            outcome = StageStatus.COMPLETED
            train = store.stage(TRAIN)
            if train is not None and train.status is not StageStatus.COMPLETED:
                store.set_stage(TRAIN, StageStatus.COMPLETED, detail=supervisor.summary_line(), progress=1.0)
        else:
            outcome = supervisor.run_until_done()
        if outcome is StageStatus.COMPLETED:
            say(describe_summary(run, config.pipeline.eval_prompts))
            if config.pipeline.after_train:
                from fm9g.orchestrator.inference.pipeline import run_post_train_stages

                # convert -> infer -> serve, each afterok the one before; finished ones are skipped.
                if run_post_train_stages(run, config, store, executor, say) != 0:
                    return 1
            say(f"wall time {time.time() - started:.1f}s")
            return 0
        return 1
    finally:
        store.close()
