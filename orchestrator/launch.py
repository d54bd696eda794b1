"""`pretrain` / `sft` / `resume`: turn a config into a run directory, prepare its data
and tokenizer, render the node scripts, and supervise the training stage."""

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

from fm9g.rundir import config as config_mod
from fm9g.rundir.atomic import read_json, write_text
from fm9g.rundir.config import ConfigError, RunConfig
from fm9g.orchestrator.render import NodeJob, config_hash, render_node
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore


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


def say(message: str) -> None:
    print(f"fm9g-launch: {message}", flush=True)


def resolve_config(options: LaunchOptions) -> tuple[RunConfig, str]:
    overrides = list(options.overrides)
    if options.nodes is not None:
        overrides.append(f"cluster.nodes={options.nodes}")
    if options.executor is not None:
        overrides.append(f"executor={options.executor}")
    if options.sft:
        overrides.append("data.sft=true")
    config, name = config_mod.load(options.config_path, overrides)
    name = options.name or name
    check_run_name(name)
    return config, name


def check_run_name(name: str) -> None:
    """A run name becomes one directory under run_root: no '/', no '..', nothing hidden."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith((".", "-")):
        raise ConfigError(f"run name {name!r} cannot be a directory name under runs/: use letters, digits, "
                          f"'-', '_' or '.' (no '/', not starting with '.' or '-'), via --name or train.model_unique")


class SupervisorLock:
    """One supervisor per run directory: an flock held for the supervisor's lifetime."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.lock
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LaunchError(f"a supervisor ({holder}) already runs for {self.path.parent}; "
                              f"watch it with `fm9g-launch status {self.path.parent}`") from None
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


def render_all(run: RunDir, config: RunConfig, python: str) -> list[Path]:
    """Render every node script of the training stage (dry run: nothing is submitted)."""
    digest = config_hash(run.config.read_text(encoding="utf-8"))
    paths = []
    for rank in range(config.cluster.nodes):
        job = NodeJob(run_name=run.name, run_dir=str(run.root), stage="train",
                      role="master" if rank == 0 else "worker", node_rank=rank, attempt=1, generation=0,
                      python=python, config_hash=digest)
        path = run.scripts / job.script_name
        write_text(path, render_node(job, config.cluster), mode=0o755)
        paths.append(path)
    return paths


def describe_summary(run: RunDir) -> str:
    summary = read_json(run.summary) or {}
    lines = [f"run {run.name} is complete"]
    if summary:
        lines.append(f"  steps run:    {summary.get('steps_run')} (step {summary.get('start_step')} -> {summary.get('final_step')})")
        lines.append(f"  loss:         {summary.get('first_loss')} -> {summary.get('last_loss')}")
        lines.append(f"  checkpoint:   {summary.get('checkpoint')}")
        lines.append(f"  tensorboard:  {summary.get('tensorboard')}   (tensorboard --logdir {shlex.quote(str(run.tensorboard))})")
    lines.append(f"  run dir:      {run.root}")
    return "\n".join(lines)


def prepare_run_dir(config: RunConfig, name: str) -> tuple[RunDir, bool]:
    """Create (or reopen) runs/<name>/ and write the resolved config; True when it existed."""
    run = RunDir.of(Path(config.run_root) / name)
    existed = run.config.exists()
    run.make()
    write_text(run.config, config_mod.dump(config))
    return run, existed


def launch(options: LaunchOptions) -> int:
    config, name = resolve_config(options)
    run = RunDir.of(Path(config.run_root) / name)
    if run.done_flag.exists() and not options.dry_run and not config.pipeline.after_train:
        say(describe_summary(run))
        say("nothing to do; give the run a new name (--name or train.model_unique) to train again")
        return 0
    run, existed = prepare_run_dir(config, name)
    python = config.cluster.python or sys.executable
    if options.dry_run:
        scripts = render_all(run, config, python)
        say(f"dry run: rendered {len(scripts)} node scripts into {run.scripts} (nothing submitted)")
        for path in scripts:
            print(f"  {path}")
        return 0
    if existed:
        step = run.latest_step()
        greeting = f"resuming run {name} in {run.root}" + (f" from checkpoint step {step}" if step is not None else "")
    else:
        greeting = f"new run {name} in {run.root}"
    return supervise_locked(run, detach_it=options.detach, progress=options.progress, greeting=greeting)


def supervise_locked(run: RunDir, *, detach_it: bool, progress: bool, greeting: str) -> int:
    """Take the run's supervisor lock, then supervise here or in the background."""
    lock = SupervisorLock(run)
    lock.acquire()
    if detach_it:
        lock.release()  # the background supervisor takes it again
        return detach(run)
    try:
        say(greeting)
        return supervise(run, progress=progress)
    finally:
        lock.release()


def detach(run: RunDir) -> int:
    """Start the supervisor in the background and return; it writes supervisor.log."""
    log = run.root / "supervisor.log"
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "fm9g.orchestrator.cli", "resume", str(run.root), "--no-progress"],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    say(f"supervisor started in the background (pid {child.pid}); log: {log}")
    say(f"watch it: fm9g-launch status {shlex.quote(str(run.root))}   or   fm9g-launch tui {shlex.quote(str(run.root))}")
    return 0


def preflight(config: RunConfig, run: RunDir) -> list[str]:
    """Checks against the cluster before anything waits in the queue (Slurm only)."""
    if config.executor != "slurm":
        return []
    from fm9g.orchestrator.slurm import preflight as slurm_preflight

    try:
        warnings = slurm_preflight.check_run(config, run)
    except slurm_preflight.PreflightError as exc:
        raise ConfigError(f"not submitted: {exc}") from None
    write_text(run.config, config_mod.dump(config))  # check_run drops unknown excluded nodes
    return warnings


def supervise(run: RunDir, progress: bool = True) -> int:
    """Check, prepare the data and tokenizer, then run the training stage to its end."""
    from fm9g.orchestrator import prepare
    from fm9g.orchestrator.executors import make_executor
    from fm9g.orchestrator.supervisor import TrainSupervisor

    config = config_mod.load_resolved(run.config)
    for warning in preflight(config, run):
        say(f"warning: {warning}")
    store = StateStore(run.state_db)
    store.set_meta("owner", getpass.getuser())
    store.set_meta("executor", config.executor)
    store.set_meta("nodes", config.cluster.nodes)
    if store.meta("created_at") is None:
        store.set_meta("created_at", time.time())
    started = time.time()
    try:
        try:
            mixture = prepare.index_datasets(config, run, store, say, progress=progress)
            config.data.dataset_config = str(mixture)
            if config.data.tokenizer_path is None:
                config.data.tokenizer_path = str(prepare.train_tokenizer(config, run, store, say))
        except ConfigError:
            raise
        except Exception as exc:  # a data error names its file:line; show it as is
            if type(exc).__name__ in ("DataError", "MixtureError"):
                raise ConfigError(str(exc)) from None
            raise
        write_text(run.config, config_mod.dump(config))
        executor = make_executor(config.executor, since=store.meta("created_at"))
        supervisor = TrainSupervisor(run, config, store, executor, say=say,
                                     repair=config.executor == "slurm" or config.supervise.repair_local,
                                     python=config.cluster.python or sys.executable)
        # A finished training stage is not run again (post-training stages may still be due).
        outcome = "COMPLETED" if run.done_flag.exists() else supervisor.run_until_done()
        if outcome == "COMPLETED":
            say(describe_summary(run))
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
