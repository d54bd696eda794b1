"""The body of each CLI command: read input, call the library, close in `finally`.
Errors of every layer become one line on stderr with a non-zero exit code."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fm9g.rundir.config import ConfigError


def dispatch(args: argparse.Namespace) -> int:
    from fm9g.launchers.prompts import InferenceError
    from fm9g.orchestrator.launch import LaunchError

    handlers = {
        "pretrain": run_launch,
        "sft": run_launch,
        "resume": run_resume,
        "index": run_index,
        "status": run_status,
        "logs": run_logs,
        "cancel": run_cancel,
        "tui": run_tui,
        "plot": run_plot,
        "config": run_config,
        "doctor": run_doctor,
        "convert": run_convert,
        "import": run_import,
        "infer": run_infer,
        "serve": run_serve,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, LaunchError, InferenceError) as exc:
        print(f"fm9g-launch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # run_index turns SIGTERM into KeyboardInterrupt(SIGTERM) so both run the same clean-up.
        code = 128 + exc.args[0] if exc.args and isinstance(exc.args[0], int) else 130
        if args.command == "index":
            print(
                f"fm9g-launch: index interrupted; its temporary folders were removed and {args.output} was not "
                "changed (an index already there is kept as it was); run the same command again to index "
                "from the start",
                file=sys.stderr,
            )
        else:
            print(
                "fm9g-launch: interrupted (`fm9g-launch status` lists every job a run has, running or not)",
                file=sys.stderr,
            )
        return code


def run_launch(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.launch import LaunchOptions, launch

    options = LaunchOptions(
        config_path=args.config,
        overrides=args.overrides,
        nodes=args.nodes,
        executor=args.executor,
        name=args.name,
        dry_run=args.dry_run,
        detach=args.detach,
        sft=args.command == "sft",
        progress=args.progress,
        yes=args.yes,
    )
    return launch(options)


def _run_dir(path: Path) -> RunDir:  # noqa: F821
    from fm9g.orchestrator.launch import LaunchError
    from fm9g.rundir import RunDir

    run = RunDir.of(path)
    if not run.config.exists():
        candidate = RunDir.of(Path("runs") / path)
        if candidate.config.exists():
            return candidate
        raise LaunchError(f"{path} is not a run directory (no config.yaml); runs live under ./runs/<name>")
    return run


def run_resume(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.launch import resume

    return resume(_run_dir(args.run), detach_it=args.detach, progress=args.progress)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a batch system's stop) takes Ctrl-C's clean-up path while the block
    runs; signal handlers can only be set from the main thread, elsewhere this does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_index(args: argparse.Namespace) -> int:
    from fm9g.data.indexer import build_index

    if args.output.resolve() == args.path.resolve() or (
        args.path.is_dir() and args.output.resolve() == args.path.resolve()
    ):
        raise ConfigError(f"--output {args.output} is the input; write the index to a different directory")
    # SIGTERM stops the pool's workers and removes the hidden temporary folders, as Ctrl-C does.
    try:
        with _sigterm_as_interrupt(), byte_progress_bar(f"index {args.path.name}", args.progress) as bar:
            result = build_index(
                args.path,
                args.output,
                language=args.language,
                tokenizer=args.tokenizer,
                processes=args.processes,
                on_error=args.on_error,
                progress=bar,
            )
    except Exception as exc:
        if type(exc).__name__ == "DataError":
            print(f"fm9g-launch: error: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"indexed {result.nlines} lines ({result.nbytes} bytes) into {args.output}")
    if result.stale_removed:
        print(
            f"  removed {len(result.stale_removed)} temporary folder(s) of killed earlier runs "
            f"({result.stale_bytes / 2**20:.1f} MiB)"
        )
    for name, kinds in result.errors.items():
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        print(f"  skipped in {name}: {counts}")
    for example in result.examples:
        print(f"    e.g. {example}")
    for name, kinds in result.warnings.items():
        counts = ", ".join(f"{count} lines with {kind.replace('_', ' ')}" for kind, count in sorted(kinds.items()))
        print(
            f"  warning: {name}: {counts}: kept, but strict JSON parsers reject raw control characters "
            "(NUL, \\r, ...) inside strings; escape them (\\u0000) if other tools read this data"
        )
    for example in result.warning_examples:
        print(f"    first at {example}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from fm9g.orchestrator import status, views
    from fm9g.orchestrator.launch import LaunchError

    if args.run:
        # Not `_run_dir`: a run whose config.yaml is gone is still a run to report on.
        run = views.find_run(args.run)
        if run is None:
            raise LaunchError(
                f"{args.run} is not a run directory (no config.yaml or state.db); runs live under ./runs/<name>"
            )
        runs = [run]
    else:
        runs = status.find_runs(args.runs_root)
    if args.json:
        print(status.render_json(runs))
        return 0
    if args.failures:
        status.print_failures(runs)
        return 0
    status.print_tables(runs)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.state import StateStore

    run = _run_dir(args.run)
    if args.role == "supervisor":
        follow_log(supervisor_log(run, args.follow), follow=args.follow)
        return 0
    node = args.node if args.node is not None else (0 if args.role == "master" else 1)
    store = StateStore(run.state_db, readonly=True)
    try:
        rows = [r for r in store.jobs(args.stage) if r.role == args.role and r.node_rank == node]
    finally:
        store.close()
    if not rows:
        raise ConfigError(f"no {args.role} job for node {node} in stage {args.stage} of {run.name}")
    path = Path(rows[-1].log)
    follow_log(path, follow=args.follow)
    return 0


def supervisor_log(run: RunDir, follow: bool) -> Path:  # noqa: F821
    """RUN/supervisor.log, written by a detached supervisor and by a supervisor job.  A
    missing one is an error unless followed (a queued supervisor job has not started)."""
    path = run.supervisor_log
    if not path.exists() and not follow:
        raise ConfigError(
            f"{path} does not exist: the supervisor of {run.name} ran in the foreground (its output went to "
            "that terminal), or its job has not started yet; follow it with -f to wait for the log"
        )
    return path


def follow_log(path: Path, follow: bool, interval: float = 0.5) -> None:
    """Print a log; with follow, keep printing as it grows and start over if it shrinks."""
    position = 0
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < position:  # truncated or rotated
            position = 0
        if size > position:
            with open(path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read(size - position)
            position = size
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
        if not follow:
            return
        time.sleep(interval)


def run_cancel(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.actions import CancelError, cancel_run

    run = _run_dir(args.run)
    try:
        result = cancel_run(run, job_id=args.job)
    except CancelError as exc:
        print(f"fm9g-launch: error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


def run_tui(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.launch import LaunchError
    from fm9g.orchestrator.tui.app import make_app

    target: Path = args.run or Path("runs")
    if (
        args.run is not None
        and not (target / "config.yaml").exists()
        and (Path("runs") / target / "config.yaml").exists()
    ):
        target = Path("runs") / target
    if not target.is_dir():
        raise LaunchError(f"{target} is neither a run directory nor a directory of runs; runs live under ./runs/<name>")
    if args.interval <= 0:
        raise ConfigError(f"--interval {args.interval}: give a positive number of seconds")
    make_app(target, interval=args.interval).run()
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.plot import PlotError, plot_run

    run = _run_dir(args.run)
    try:
        output = plot_run(run, args.output)  # default: runs/NAME/curves.png
    except PlotError as exc:
        print(f"fm9g-launch: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    """`doctor`: the checks as a table (or JSON); exit 1 when one fails."""
    from fm9g.orchestrator.doctor import run_doctor as doctor
    from fm9g.orchestrator.doctor_checks import render_table
    from fm9g.rundir import site

    config = site.load(args.config, args.overrides).config
    # SIGTERM takes Ctrl-C's path, so the probe jobs are cancelled (in run_doctor's finally).
    try:
        with _sigterm_as_interrupt():
            report = doctor(config, timeout_s=args.timeout, say=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt as exc:
        print("fm9g-launch: doctor interrupted; its probe jobs were cancelled", file=sys.stderr)
        return 128 + exc.args[0] if exc.args and isinstance(exc.args[0], int) else 130
    if args.json:
        print(report.to_json())
    else:
        from rich.console import Console

        Console().print(render_table(report))
        print(f"the record: {report.folder}/doctor.json")
    return 0 if report.ok else 1


def run_config(args: argparse.Namespace) -> int:
    """`config show`: the resolved config, each field with its source."""
    import json

    from fm9g.rundir import site

    layered = site.load(args.config, args.overrides)
    rows = {
        name: (value, origin)
        for name, (value, origin) in layered.provenance().items()
        if not (args.changed and origin.kind == "default")
    }
    if args.json:
        record = {
            name: {"value": value, "source": origin.kind, "path": origin.path} for name, (value, origin) in rows.items()
        }
        print(json.dumps(record, indent=2, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    files = [layered.site_note] + ([f"run config: {layered.source}"] if layered.source else [])
    table = Table(title="\n".join(files), title_justify="left")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    styles = {"default": "dim", "site file": "cyan", "run config": "", "--set": "bold"}
    for name, (value, origin) in rows.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        table.add_row(escape(name), escape(shown), origin.kind, style=styles[origin.kind])
    Console().print(table)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.importer import ImportError_, import_released

    try:
        with byte_progress_bar(f"import {args.source.name}", args.progress) as bar:
            imported = import_released(
                args.source, args.output, model=args.model, tokenizer=args.tokenizer, force=args.force, progress=bar
            )
    except ImportError_ as exc:
        print(f"fm9g-launch: error: {exc}", file=sys.stderr)
        return 2
    print(imported.describe())
    return 0


def _convert_released(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.importer import ImportError_, convert_released_source

    try:
        with byte_progress_bar(f"convert {args.run.name}", args.progress) as bar:
            folder = convert_released_source(
                args.run, args.output, model=args.model, tokenizer=args.tokenizer, progress=bar
            )
    except ImportError_ as exc:
        print(f"fm9g-launch: error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.importer import is_released_source
    from fm9g.orchestrator.inference.jobs import open_context
    from fm9g.orchestrator.inference.stages import convert_stage, resolve_target
    from fm9g.orchestrator.launch import say

    if is_released_source(args.run):
        return _convert_released(args)
    target = resolve_target(_run_dir(args.run).root)
    ctx = open_context(target.run, target.config, args.executor or target.config.executor, say)
    try:
        print(convert_stage(ctx, step=args.step, output=args.output))
    finally:
        ctx.store.close()
    return 0


def _target_context(args: argparse.Namespace) -> tuple[Target, StageContext]:  # noqa: F821
    from fm9g.orchestrator.inference.jobs import open_context
    from fm9g.orchestrator.inference.stages import resolve_target
    from fm9g.orchestrator.launch import say

    target = resolve_target(args.target, name=args.name, overrides=args.overrides)
    return target, open_context(target.run, target.config, args.executor or target.config.executor, say)


def run_infer(args: argparse.Namespace) -> int:
    from fm9g.launchers.prompts import read_prompts, sampling_from, sampling_per_prompt
    from fm9g.orchestrator.inference.serve_stage import check_engine_args
    from fm9g.orchestrator.inference.stages import convert_stage, infer_stage

    sampling = sampling_from(args)
    # A bad prompt file, or sampling the engine would refuse, fails before any conversion.
    sampling_per_prompt(args.prompts, read_prompts(args.prompts), sampling, args.engine)
    check_engine_args(args.engine, args.engine_args)
    target, ctx = _target_context(args)
    try:
        model = target.model or convert_stage(ctx)
        chat = args.chat if args.chat is not None else (target.config.data.sft if target.model is None else False)
        print(
            infer_stage(
                ctx,
                model=model,
                prompts=args.prompts,
                output=args.output,
                sampling=sampling,
                chat=chat,
                engine=args.engine,
                force=args.force,
                trust_remote_code=args.trust_remote_code,
                engine_args=args.engine_args,
            )
        )
    finally:
        ctx.store.close()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from fm9g.orchestrator.inference.jobs import open_context
    from fm9g.orchestrator.inference.serve_stage import (
        EXECUTOR_META,
        api_key_of,
        check_engine_args,
        serve_stage,
        stop_serve,
    )
    from fm9g.orchestrator.inference.stages import convert_stage
    from fm9g.orchestrator.launch import say
    from fm9g.orchestrator.state import StateStore
    from fm9g.rundir.config import load_resolved

    if args.stop:
        from fm9g.orchestrator.inference.stages import resolve_target

        run = resolve_target(args.target, name=args.name).run  # a run, or the run dir a model folder was served from
        store = StateStore(run.state_db)
        try:  # cancel through the executor that started the server, whatever the config says now
            kind = store.meta(EXECUTOR_META) or load_resolved(run.config).executor
        finally:
            store.close()
        ctx = open_context(run, load_resolved(run.config), kind, say)
        try:
            ids = stop_serve(ctx)
        finally:
            ctx.store.close()
        print(f"stopped serving {run.name}: cancelled {len(ids)} job(s): {' '.join(ids) or '-'}")
        return 0
    api_key = api_key_of(api_key=args.api_key, api_key_file=args.api_key_file)
    check_engine_args(args.engine, args.engine_args)  # before any conversion
    target, ctx = _target_context(args)
    try:
        model = target.model or convert_stage(ctx)
        endpoint = serve_stage(
            ctx,
            model=model,
            port=args.port,
            engine=args.engine,
            wait=args.wait,
            timeout=args.wait_timeout,
            api_key=api_key,
            trust_remote_code=args.trust_remote_code,
            engine_args=args.engine_args,
        )
    finally:
        ctx.store.close()
    if endpoint:
        print(endpoint["url"])
    return 0


@contextlib.contextmanager
def byte_progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich byte progress bar for `fm9g-launch index`, or a silent callback."""
    if not enabled:
        yield lambda done, total: None
        return
    from fm9g.data.progress import byte_progress

    with byte_progress(description) as update:
        yield update
