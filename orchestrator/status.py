"""`fm9g-launch status`: prints the facts of one or many runs, as rich tables or as
JSON.  Printing only: `fm9g.orchestrator.views` reads the run directories (never Slurm)
and builds the plain dict behind both views, whose shape is the stable JSON schema
(docs/status-schema.md, version in SCHEMA_VERSION).

A run that cannot be read is still listed, with one line saying why and what to do;
every other run is shown as usual.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from fm9g.orchestrator.recovery import RecoveryPhase
from fm9g.orchestrator.tui.format import format_clock, format_elapsed, format_loss, format_lr, format_node_seconds
from fm9g.orchestrator.views import collect, find_runs
from fm9g.rundir import RunDir

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SCHEMA_VERSION", "collect", "find_runs", "render_json", "print_tables", "print_failures"]

SCHEMA_VERSION = 1


def render_json(runs: list[RunDir]) -> str:
    """The `status --json` document: one entry per run, a broken one with its `error`."""
    return json.dumps(
        {"schema": SCHEMA_VERSION, "generated_at": time.time(), "runs": [collect(r) for r in runs]},
        ensure_ascii=False,
        indent=2,
    )


def print_tables(runs: list[RunDir]) -> None:
    """One header line and a job table per run; an unreadable part is one red line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not runs:
        console.print(
            "no runs found (runs live under ./runs/<name>; start one with `fm9g-launch pretrain --config ...`)"
        )
        return
    for run in runs:
        facts = collect(run)
        progress = facts["progress"]
        # Names and paths are user text: escape them so a '[' is not read as Rich markup.
        line = f"[bold]{escape(facts['name'])}[/bold]  {facts['status']}  ({escape(facts['path'])})"
        if progress:
            total = progress.get("train_iters")
            line += (
                f"\n  step {progress['step']}"
                + (f"/{total}" if total else "")
                + f"  loss {format_loss(progress['loss'])}  lr {format_lr(progress['lr'])}"
            )
        if facts.get("supervisor_job"):
            line += f"\n  supervisor: Slurm job {escape(str(facts['supervisor_job']))} (supervise.where: job)"
            if facts.get("supervisor_state"):
                line += f", {facts['supervisor_state']}"
        if facts.get("waiting_node_seconds") is not None:
            line += (
                f"\n  waiting: {format_node_seconds(facts['waiting_node_seconds'])} holding nodes while others queued"
            )
        if facts["error"]:
            error = facts["error"]
            line += f"\n  [red]{escape(error['source'])}: {escape(error['message'])}[/red]; {escape(error['fix'])}"
        if facts.get("serve"):
            serve = facts["serve"]
            line += f"\n  serving at http://{serve.get('host')}:{serve.get('port')}/v1"
            if serve.get("job_id"):
                line += f"  (job {serve['job_id']}, {serve.get('engine', '-')})"
        console.print(line)
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for column in ("stage", "role", "node", "attempt", "job id", "host", "state", "elapsed"):
            table.add_column(column)
        latest: dict[tuple[str, str, int], dict] = {}
        for job in facts["jobs"]:
            latest[(job["stage"], job["role"], job["node_rank"])] = job
        for job in latest.values():
            state = job["state"] + (f" ({job['reason']})" if job["reason"] and job["state"] == "PENDING" else "")
            table.add_row(
                job["stage"],
                job["role"],
                str(job["node_rank"]),
                str(job["attempt"]),
                str(job["job_id"] or "-"),
                job["node"] or "-",
                state,
                format_elapsed(job["elapsed"]),
            )
        with_jobs = {job["stage"] for job in facts["jobs"]}
        for stage in facts["stages"]:  # stages with no job of their own (skipped, not started)
            if stage["name"] not in with_jobs:
                table.add_row(stage["name"], "-", "-", "-", "-", "-", stage["status"], "-")
        if table.row_count:
            console.print(table)
        console.print()


def print_failures(runs: list[RunDir]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    phases = [phase.value for phase in RecoveryPhase]
    for run in runs:
        facts = collect(run)
        if not facts["recoveries"] and not facts["inproc_recoveries"]:
            console.print(f"{facts['name']}: no failures recorded")
            continue
        if facts["recoveries"]:
            table = Table(title=f"{facts['name']}: recoveries", box=None)
            table.add_column("node")
            for phase in phases[1:]:
                table.add_column(f"{phase} (+s)")
            table.add_column("time to recover")
            for recovery in facts["recoveries"]:
                marks = recovery["phases"]
                start = marks.get("detected")
                cells = [f"{marks[p] - start:.1f}" if p in marks and start else "-" for p in phases[1:]]
                total = f"{marks['first_step'] - start:.1f}s" if "first_step" in marks and start else "-"
                table.add_row(str(recovery["node_rank"]), *cells, total)
            console.print(table)
        if facts["inproc_recoveries"]:
            console.print(inproc_table(facts["name"], facts["inproc_recoveries"]))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _change(before: object, after: object) -> str:
    return f"{'-' if before is None else before}->{'-' if after is None else after}"


def inproc_table(name: str, recoveries: list[dict]) -> Table:
    """The in-process recoveries (supervise.on_node_loss wait/shrink), one row each: when,
    policy, fast path or fallback, each phase in seconds after detection, steps lost,
    world size and generation before -> after."""
    from rich.table import Table

    table = Table(title=f"{name}: in-process recoveries", box=None)
    for column in ("detected", "policy", "path", "re_formed (+s)", "state_synced (+s)", "first_step (+s)"):
        table.add_column(column)
    for column in ("time to recover", "steps lost", "world", "gen"):
        table.add_column(column)
    for recovery in recoveries:
        phases = recovery["phases"]
        table.add_row(
            format_clock(recovery["detected_at"]),
            recovery["policy"],
            recovery["path"],
            _seconds(phases["re_formed"]),
            _seconds(phases["state_synced"]),
            _seconds(phases["first_step"]),
            f"{recovery['total_s']:.1f}s" if recovery["finished"] else "in progress",
            str(recovery["steps_lost"]),
            _change(recovery["world_before"], recovery["world_after"]),
            _change(recovery["generation_before"], recovery["generation_after"]),
        )
    return table
