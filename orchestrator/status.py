"""`fm9g-launch status`: the facts of one or many runs, read from their run directories
(state.db, metrics.jsonl, endpoint, heartbeats) — never from Slurm.

`collect` builds the plain dict behind both views; its shape is the stable JSON schema
(docs/status-schema.md, version in SCHEMA_VERSION).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fm9g.rundir.atomic import read_json
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import StateStore

SCHEMA_VERSION = 1


def find_runs(root: Path) -> list[RunDir]:
    if not root.is_dir():
        return []
    return sorted((RunDir.of(p) for p in root.iterdir() if (p / "config.yaml").exists()), key=lambda r: r.name)


def last_metrics(run: RunDir, max_bytes: int = 65536) -> dict[str, Any] | None:
    """The last complete line of metrics.jsonl (a partial last line is skipped)."""
    try:
        with open(run.metrics, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            lines = handle.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def collect(run: RunDir) -> dict[str, Any]:
    """Everything `status` shows about one run, as plain JSON-able data."""
    result: dict[str, Any] = {"name": run.name, "path": str(run.root), "status": "NEW", "stages": [], "jobs": [],
                              "progress": None, "endpoint": read_json(run.endpoint), "serve": read_json(run.serve_endpoint),
                              "done": run.done_flag.exists(), "recoveries": [], "owner": None, "executor": None}
    if run.state_db.exists():
        store = StateStore(run.state_db, readonly=True)
        try:
            stages = store.stages()
            jobs = store.jobs()
            events = store.events(kind="recovery")
            result["owner"] = store.meta("owner")
            result["executor"] = store.meta("executor")
        finally:
            store.close()
        result["stages"] = [{"name": s.name, "kind": s.kind, "status": s.status, "detail": s.detail,
                             "progress": s.progress, "started_at": s.started_at, "ended_at": s.ended_at} for s in stages]
        result["jobs"] = [{"id": j.id, "stage": j.stage, "role": j.role, "node_rank": j.node_rank, "attempt": j.attempt,
                           "generation": j.generation, "job_id": j.job_id, "state": j.state, "reason": j.reason,
                           "node": j.node, "exit_code": j.exit_code, "restarts": j.restarts, "elapsed": j.elapsed,
                           "log": j.log, "submitted_at": j.submitted_at} for j in jobs]
        result["recoveries"] = [{"node_rank": e.data.get("node_rank"), "phases": e.data.get("phases", {}),
                                 "message": e.message} for e in events]
        result["status"] = overall(stages)
    metrics = last_metrics(run)
    if metrics:
        summary = read_json(run.summary) or {}
        result["progress"] = {"step": metrics.get("step"), "loss": metrics.get("loss"), "lr": metrics.get("lr"),
                              "tokens_per_s": metrics.get("tokens_per_s"), "time": metrics.get("time"),
                              "train_iters": summary.get("train_iters") or _train_iters(run)}
    return result


def _train_iters(run: RunDir) -> int | None:
    try:
        from fm9g.rundir.config import load_resolved
        return load_resolved(run.config).train.train_iters
    except Exception:  # a status view never fails on one broken run
        return None


def overall(stages: list) -> str:
    statuses = [s.status for s in stages]
    if not statuses:
        return "NEW"
    for status in ("FAILED", "CANCELLED", "RUNNING"):
        if status in statuses:
            return status
    if all(s in ("COMPLETED", "SKIPPED") for s in statuses):
        return "COMPLETED"
    return "PENDING"


def render_json(runs: list[RunDir]) -> str:
    return json.dumps({"schema": SCHEMA_VERSION, "generated_at": time.time(), "runs": [collect(r) for r in runs]},
                      ensure_ascii=False, indent=2)


def format_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def print_tables(runs: list[RunDir]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not runs:
        console.print("no runs found (runs live under ./runs/<name>; start one with `fm9g-launch pretrain --config ...`)")
        return
    for run in runs:
        facts = collect(run)
        progress = facts["progress"]
        # Names and paths are user text: escape them so a '[' is not read as Rich markup.
        line = f"[bold]{escape(facts['name'])}[/bold]  {facts['status']}  ({escape(facts['path'])})"
        if progress:
            total = progress.get("train_iters")
            line += f"\n  step {progress['step']}" + (f"/{total}" if total else "") + \
                    f"  loss {progress['loss']:.4f}  lr {progress['lr']:.3g}"
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
            table.add_row(job["stage"], job["role"], str(job["node_rank"]), str(job["attempt"]), str(job["job_id"] or "-"),
                          job["node"] or "-", state, format_elapsed(job["elapsed"]))
        for stage in facts["stages"]:
            if stage["kind"] != "train":
                table.add_row(stage["name"], "-", "-", "-", "-", "-", stage["status"], "-")
        console.print(table)
        console.print()


def print_failures(runs: list[RunDir]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    phases = ("detected", "resubmitted", "allocated", "rendezvous", "first_step")
    for run in runs:
        facts = collect(run)
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
        console.print(table if facts["recoveries"] else f"{facts['name']}: no failures recorded")
