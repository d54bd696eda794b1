"""Helpers the Slurm benchmarks share: a tiny-run launcher, what a run's metrics say about
its steps, bare `sbatch --wrap` jobs as the launch reference, and slurmctld's RPC counts.

The run is launched with the tests' argv (tests/helpers/runs.py), so a benchmark and a
test start the same run; importing this module puts the repository root on sys.path."""

from __future__ import annotations

import getpass
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fm9g.orchestrator.executors.slurm import SlurmExecutor  # noqa: E402
from fm9g.orchestrator.slurm.commands import SlurmClient  # noqa: E402
from tests.helpers.runs import metrics, pretrain_argv, wait_for  # noqa: E402 - needs REPO on sys.path

USER = getpass.getuser()


# ------------------------------------------------------------------------- the run


def start_tiny_run(
    root: Path,
    name: str,
    nodes: int,
    iters: int,
    *extra: str,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """The tiny pretraining on the test cluster (`--executor slurm`), with the config's own
    supervisor tick (what a benchmark measures).  Its output goes to `log`, or else to a
    pipe; `env` replaces the environment (a benchmark's PATH, for instance)."""
    argv = pretrain_argv(
        root,
        name,
        "--nodes",
        str(nodes),
        "--set",
        f"train.train_iters={iters}",
        "--set",
        "train.warmup_iters=0.1",
        *extra,
        executor="slurm",
        poll_interval=None,
    )
    if log is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    with open(log, "w") as out:  # the child holds its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def reuse_args(done: Path) -> tuple[str, ...]:
    """`--set`s that take a finished run's mixture and tokenizer, so a run skips the index
    and tokenizer stages (what a benchmark of the launch itself wants)."""
    return (
        "--set",
        f"data.dataset_config={done / 'mixture.json'}",
        "--set",
        f"data.tokenizer_path={done / 'tokenizer' / 'tokenizer.model'}",
    )


def first_step_time(run: Path) -> float | None:
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            return float(record["time"])
    except (OSError, ValueError, KeyError):
        return None
    return None


def first_step_after(run: Path, moment: float) -> float | None:
    """When the first step logged after `moment` was logged (None before there is one)."""
    try:
        records = metrics(run)
    except OSError:
        return None
    return next((float(r["time"]) for r in records if float(r["time"]) > moment), None)


def median_step_time(run: Path, since: float = 0.0, until: float = float("inf"), first: int | None = None) -> float:
    """Median seconds between consecutive logged steps in [since, until] (the run logs
    every step), over the first `first` records when given."""
    times = [float(r["time"]) for r in metrics(run) if since <= float(r["time"]) <= until]
    times = times[:first] if first is not None else times
    return statistics.median(b - a for a, b in zip(times, times[1:]))


# ------------------------------------------------------------------ the references


def bare_sbatch(marks_dir: Path, nodes: int) -> float:
    """Seconds from submitting `nodes` one-node `sbatch --wrap` jobs in a row to the last
    of them running its first command: the launch floor of this cluster."""
    marks = [marks_dir / f"bare-{i}" for i in range(nodes)]
    start = time.time()
    for mark in marks:
        subprocess.run(
            ["sbatch", "--parsable", "-N1", "-o", "/dev/null", f"--wrap=date +%s.%N > {mark}"],
            check=True,
            capture_output=True,
        )
    wait_for(lambda: all(m.exists() and m.read_text().strip() for m in marks), 300, "the bare jobs")
    return max(float(m.read_text()) for m in marks) - start


def user_rpcs(client: SlurmClient) -> int:
    """This user's RPC count in sdiag (cumulative; the sdiag call itself adds one)."""
    return client.sdiag_user_rpcs().get(USER, 0)


def idle_rate(client: SlurmClient, seconds: float) -> float:
    """This user's RPCs per minute with nothing of ours running (on the test bed root also
    owns slurmd's own messages, which this rate captures)."""
    before = user_rpcs(client)
    time.sleep(seconds)
    return (user_rpcs(client) - before - 1) / seconds * 60  # minus our own second sdiag


def rpcs_per_poll(client: SlurmClient, jobs: int, ticks: int) -> float:
    """RPCs one supervisor poll (SlurmExecutor.poll) costs with `jobs` live one-node jobs."""
    ids = []
    for _ in range(jobs):
        out = subprocess.run(
            ["sbatch", "--parsable", "-N1", "-o", "/dev/null", "--wrap=sleep 300"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ids.append(out.strip().split(";")[0])
    try:
        executor = SlurmExecutor(client)
        executor.poll(ids)  # warm: the first poll may need sacct for nothing
        before = user_rpcs(client)
        for _ in range(ticks):
            executor.poll(ids)
        after = user_rpcs(client)
    finally:
        subprocess.run(["scancel", *ids], check=False)
    return (after - before - 1) / ticks


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen
