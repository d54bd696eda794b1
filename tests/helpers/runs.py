"""Launch a tiny run through the CLI, wait for something to happen, and read what the run
wrote back: metrics, checkpoints, its jobs and the supervisor's events in state.db.

Tests assert on these records (kinds of events, their data, job rows, stage status),
never on what the supervisor prints for people."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from fm9g.orchestrator.state import EventRow, StageRow, StateStore

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "pretrain.yaml"

T = TypeVar("T")


# ------------------------------------------------------------------------- launching


def cli(*args: str) -> list[str]:
    """`fm9g-launch ARGS` as an argv for this interpreter."""
    return [sys.executable, "-m", "fm9g.orchestrator.cli", *args]


def pretrain_argv(
    root: Path, name: str, *extra: str, executor: str | None = "local", poll_interval: float | None = 0.5
) -> list[str]:
    """`fm9g-launch pretrain` of the tiny example as run `name` under `root`: no progress
    bar, every step logged, a short supervisor tick (None keeps the config's).  `extra`
    comes last, so its `--set` options win over these.

    The executor is named (local by default, with --yes: the tiny run has two nodes and the
    test cluster answers wherever these tests run); None leaves it to `auto`."""
    argv = cli("pretrain", "--config", str(TINY), "--name", name, "--no-progress")
    if executor is not None:
        argv += ["--executor", executor]
    if executor == "local":
        argv += ["--yes"]
    argv += ["--set", f"run_root={root}", "--set", "train.log_iters=1"]
    if poll_interval is not None:
        argv += ["--set", f"supervise.poll_interval={poll_interval}"]
    return [*argv, *extra]


def run_tiny(
    root: Path,
    name: str,
    *extra: str,
    executor: str | None = "local",
    cwd: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the tiny pretraining to its end and return its exit status and output."""
    return subprocess.run(
        pretrain_argv(root, name, *extra, executor=executor), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_tiny(
    root: Path,
    name: str,
    *extra: str,
    executor: str | None = "local",
    cwd: Path | None = None,
    log: Path | None = None,
    poll_interval: float | None = 0.5,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Start the tiny pretraining in the background.  Its output goes to the file `log`,
    or else to a pipe (read it with `communicate`).  `new_session` puts it in its own
    process group, so a test can kill the supervisor's whole group (os.killpg)."""
    out: IO[str] | int = subprocess.PIPE
    if log is not None:
        out = open(log, "w")  # noqa: SIM115 - the child holds it; ours is closed below
    try:
        return subprocess.Popen(
            pretrain_argv(root, name, *extra, executor=executor, poll_interval=poll_interval),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def wait_for(predicate: Callable[[], T], limit: float, what: str, interval: float = 0.2) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail naming
    `what` after `limit` seconds (a bound on waiting, never a timing assertion)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


# ------------------------------------------------------------------ the run directory


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records; a line still being written is skipped."""
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def inproc_lines(run: Path, name: str) -> list[dict]:
    """In-process recovery events named `name`, straight from the run's events/inproc/
    files (the supervisor imports them into state.db only on its next tick), oldest first."""
    found = []
    for path in (run / "events" / "inproc").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
    return sorted(found, key=lambda record: record["t"])


def losses(run: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (re-done after a failure) keeps its last value."""
    return {int(record["step"]): float(record["loss"]) for record in metrics(run)}


def last_step(run: Path) -> int:
    """The last step in metrics.jsonl (0 before the first)."""
    try:
        return max(losses(run))
    except (OSError, ValueError):
        return 0


def checkpoint_step(run: Path) -> int:
    """The step of checkpoints/latest (0 before the first)."""
    try:
        return int((run / "checkpoints" / "latest").read_text())
    except (OSError, ValueError):
        return 0


# --------------------------------------------------------------------------- state.db


@contextmanager
def state(run: Path) -> Iterator[StateStore]:
    """The run's state.db, read-only."""
    store = StateStore(run / "state.db", readonly=True)
    try:
        yield store
    finally:
        store.close()


def events(run: Path, kind: str) -> list[EventRow]:
    with state(run) as store:
        return store.events(kind)


def stage(run: Path, name: str = "train") -> StageRow | None:
    with state(run) as store:
        return store.stage(name)


@dataclass(frozen=True)
class Submission:
    """One `submitted` event with the job row it created."""

    role: str
    node_rank: int
    attempt: int
    generation: int
    job_id: str
    why: str  # "start", "repair after infrastructure failure", ...


@dataclass(frozen=True)
class NodeFailure:
    """One `failure` event: which node job ended how, and the supervisor's class for it."""

    role: str
    node_rank: int
    klass: str  # a FailureClass value: "infrastructure", "application", "do-not-retry", "continue"
    node: str
    job_id: str


def submissions(run: Path, stage: str = "train") -> list[Submission]:
    """Every job submission of `stage`, oldest first."""
    with state(run) as store:
        found = []
        for event in store.events("submitted"):
            row = store.job(event.job) if event.job is not None else None
            assert row is not None, f"submitted event {event.id} names no job row"
            if row.stage == stage:
                found.append(
                    Submission(
                        row.role,
                        row.node_rank,
                        row.attempt,
                        row.generation,
                        str(row.job_id),
                        str(event.data.get("why", "")),
                    )
                )
        return found


def failures(run: Path, stage: str = "train") -> list[NodeFailure]:
    """Every job failure of `stage` the supervisor recorded, oldest first."""
    with state(run) as store:
        found = []
        for event in store.events("failure"):
            row = store.job(event.job) if event.job is not None else None
            assert row is not None, f"failure event {event.id} names no job row"
            if row.stage != stage:
                continue
            found.append(
                NodeFailure(
                    row.role, row.node_rank, str(event.data["klass"]), str(event.data.get("node", "")), str(row.job_id)
                )
            )
        return found


@dataclass(frozen=True)
class LiveJob:
    job_id: str
    node: str
    role: str
    node_rank: int


def live_jobs(run: Path) -> list[LiveJob]:
    """The train stage's RUNNING node jobs."""
    with state(run) as store:
        rows = store.jobs("train", live_only=True)
    return [LiveJob(str(r.job_id), r.node, r.role, r.node_rank) for r in rows if r.job_id and r.state == "RUNNING"]


def live_job(run: Path, role: str) -> LiveJob:
    """The newest live (submitted, not ended) train job of `role`."""
    with state(run) as store:
        rows = [r for r in store.jobs("train", live_only=True) if r.role == role and r.job_id]
    assert rows, f"no live {role} job"
    row = rows[-1]
    return LiveJob(str(row.job_id), row.node, row.role, row.node_rank)
