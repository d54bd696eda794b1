"""Figures at scale: the tiny model on the test cluster at 4, 8 and 16 nodes, against the
node count, each beside a reference measured in the same run.

For each node count N, in this order:
  1. N bare `sbatch --wrap` jobs: submit → the last one runs its first command;
  2. this user's slurmctld RPC rate with nothing of ours running (sdiag, 20 s): the idle rate;
  3. one run, `--executor slurm --nodes N`, reusing the warm-up run's data and tokenizer so
     the launch is the run's own: command → first step; then a steady window of
     --window seconds of training (RPCs per minute, the supervisor's poll ticks and RPCs
     per tick, its CPU seconds per minute); then a worker job scancelled right after a
     step → the first step logged after it (and the run's own `recovery` event); then
     `fm9g-launch cancel`;
  4. one supervisor poll (SlurmExecutor.poll) alone with N live jobs: RPCs per poll.

The supervisor's poll ticks are counted by putting, on its PATH only, a directory where
each Slurm command appends "<parent pid> <time> <command>" to a log and then execs the
real command: a tick is one squeue by the supervisor's own pid.

    python benchmarks/scale.py [--nodes-list 4,8,16] [--window 90] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _slurm import (
    bare_sbatch,
    first_step_after,
    first_step_time,
    idle_rate,
    load_average,
    median_step_time,
    reuse_args,
    rpcs_per_poll,
    start_tiny_run,
    user_rpcs,
)

from fm9g.orchestrator.slurm.commands import SlurmClient
from tests.helpers import faults, runs  # _slurm put the repository root on sys.path

SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
# Large enough that no node count finishes before the benchmark cancels it.
ITERS = 100_000


# ------------------------------------------------------------------ what is watched


def command_shims(directory: Path, log: Path) -> Path:
    """A directory of Slurm commands that each log "<parent pid> <epoch> <name>" to `log`
    and exec the real one; put first on the supervisor's PATH (bash's $EPOCHREALTIME: no
    extra process per call)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in SLURM_COMMANDS:
        real = shutil.which(name)
        if real is None:
            raise SystemExit(f"{name} is not on PATH: run this on the test cluster's host")
        shim = directory / name
        shim.write_text(
            "#!/bin/bash\n"
            f'echo "$PPID $EPOCHREALTIME {name}" >> {shlex.quote(str(log))}\n'
            f'exec {shlex.quote(real)} "$@"\n'
        )
        shim.chmod(0o755)
    return directory


def calls_by(log: Path, pid: int, since: float, until: float) -> Counter[str]:
    """The Slurm commands process `pid` ran between `since` and `until`, by name."""
    calls: Counter[str] = Counter()
    if not log.exists():
        return calls
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == str(pid) and since <= float(parts[1]) <= until:
            calls[parts[2]] += 1
    return calls


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own utime+stime, its waited-for children's) of a live or not yet reaped process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])  # stat fields 14-17
    return (utime + stime) / CLOCK_TICK, (cutime + cstime) / CLOCK_TICK


def memory_used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


@dataclass(frozen=True)
class Mark:
    """The counters at one moment of a run."""

    time: float
    rpcs: int  # this user's sdiag count (the sdiag call itself is one more)
    cpu: float  # the supervisor's own CPU seconds
    cpu_children: float  # its Slurm commands' (and other reaped children's)


@dataclass(frozen=True)
class Window:
    """What happened between two marks, with the idle RPC rate taken off."""

    minutes: float
    rpcs: float  # attributable: the count, less our own sdiag and the idle rate
    ticks: int
    calls: dict[str, int]
    cpu: float
    cpu_children: float

    @classmethod
    def between(cls, a: Mark, b: Mark, idle_per_min: float, calls: Counter[str]) -> Window:
        minutes = (b.time - a.time) / 60
        return cls(
            minutes=minutes,
            rpcs=b.rpcs - a.rpcs - 1 - idle_per_min * minutes,
            ticks=calls["squeue"],
            calls=dict(calls),
            cpu=b.cpu - a.cpu,
            cpu_children=b.cpu_children - a.cpu_children,
        )

    def per_minute(self, value: float) -> float:
        return value / self.minutes if self.minutes else float("nan")


@dataclass
class Figures:
    """One node count's figures (the --json rows)."""

    nodes: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bare_s: float = 0.0
    launch_s: float = 0.0
    idle_rpm: float = 0.0
    steady_rpm: float = 0.0
    steady_ticks_per_min: float = 0.0
    steady_rpcs_per_tick: float = 0.0
    poll_rpcs_alone: float = 0.0
    supervisor_rpm: float = 0.0  # its squeue calls per minute x what one poll costs alone
    cpu_s_per_min: float = 0.0
    cpu_children_s_per_min: float = 0.0
    run_rpm: float = 0.0
    run_cpu_s_per_min: float = 0.0
    step_s: float = 0.0
    recover_s: float = 0.0
    recovery_phases: dict[str, float] = field(default_factory=dict)
    recovery_rpcs: float = 0.0
    peak_memory_mib: float = 0.0
    windows: dict[str, dict] = field(default_factory=dict)


# ------------------------------------------------------------------------- one run


class Watched:
    """One running supervisor: marks of its counters, waits that fail when it exits early,
    and the peak memory of the machine meanwhile."""

    def __init__(self, proc: subprocess.Popen[str], client: SlurmClient, log: Path) -> None:
        self.proc = proc
        self.client = client
        self.log = log
        self.base_memory = memory_used_mib()
        self.peak_memory = 0.0

    def mark(self) -> Mark:
        cpu, children = cpu_seconds(self.proc.pid)
        return Mark(time.time(), user_rpcs(self.client), cpu, children)

    def until(self, predicate, limit: float, what: str, interval: float = 0.5):
        def check():
            self.peak_memory = max(self.peak_memory, memory_used_mib() - self.base_memory)
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"the supervisor exited {self.proc.returncode} while waiting for {what}; see {self.log}"
                )
            return predicate()

        return runs.wait_for(check, limit, what, interval)

    def exited(self, limit: float) -> Mark:
        """Wait for the supervisor to exit, mark its final counters (an exited, unreaped
        process keeps them in /proc), then reap it."""
        deadline = time.monotonic() + limit
        while True:
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the supervisor did not exit within {limit}s; see {self.log}")
            time.sleep(0.2)
        final = self.mark()
        self.proc.wait()
        return final


def measure(root: Path, nodes: int, window_s: float, reuse: Path, client: SlurmClient, ticks: int) -> Figures:
    # Each phase starts with N idle nodes, so none of them waits for the previous one's jobs.
    runs.wait_for(lambda: idle_nodes() >= nodes, 900, f"{nodes} idle nodes")
    figures = Figures(nodes=nodes, load_before=load_average())
    marks_dir = root / f"bare{nodes}"
    marks_dir.mkdir()
    figures.bare_s = bare_sbatch(marks_dir, nodes)
    runs.wait_for(lambda: idle_nodes() >= nodes, 300, f"{nodes} idle nodes after the bare jobs")
    figures.idle_rpm = idle_rate(client, 20)

    name = f"scale{nodes}"
    run, log = root / name, root / f"{name}.log"
    calls_log = root / f"{name}.calls"
    env = dict(os.environ, PATH=f"{command_shims(root / 'shims', calls_log)}{os.pathsep}{os.environ['PATH']}")
    before_rpcs = user_rpcs(client)
    start = time.time()
    proc = start_tiny_run(
        root,
        name,
        nodes,
        ITERS,
        *reuse_args(reuse),
        "--set",
        "train.save_iters=5",
        "--set",
        "pipeline.eval_prompts=null",
        log=log,
        env=env,
    )
    watched = Watched(proc, client, log)
    begin = Mark(start, before_rpcs, 0.0, 0.0)
    try:
        first = watched.until(lambda: first_step_time(run), 900, "the first training step")
        figures.launch_s = first - start
        steady_from = watched.mark()
        time.sleep(window_s)
        watched.until(lambda: runs.checkpoint_step(run) >= 5 and len(runs.live_jobs(run)) == nodes, 600, "a checkpoint")
        # The fault lands right after a step was logged, as in recovery.py.
        logged = runs.last_step(run)
        watched.until(lambda: runs.last_step(run) > logged, 300, "a fresh step", interval=0.05)
        steady_to = watched.mark()
        fault_at = time.time()
        faults.scancel_worker(run)
        recovered = watched.until(lambda: first_step_after(run, fault_at + 0.05), 900, "the first step after the fault")
        recovered_mark = watched.mark()
        figures.recover_s = recovered - fault_at
        event = watched.until(lambda: runs.events(run, "recovery"), 300, "the run's recovery event")[0]
        phases = event.data["phases"]
        figures.recovery_phases = {k: round(v - fault_at, 2) for k, v in phases.items()}
        figures.step_s = median_step_time(run, since=steady_from.time, until=steady_to.time)
    except BaseException:
        # A failed measurement leaves no run behind on the shared cluster.
        subprocess.run(runs.cli("cancel", str(run)), capture_output=True)
        raise
    subprocess.run(runs.cli("cancel", str(run)), check=True, capture_output=True)
    end = watched.exited(300)
    figures.load_after = load_average()
    figures.peak_memory_mib = watched.peak_memory

    pid = proc.pid
    steady = Window.between(
        steady_from, steady_to, figures.idle_rpm, calls_by(calls_log, pid, steady_from.time, steady_to.time)
    )
    recovery = Window.between(
        steady_to, recovered_mark, figures.idle_rpm, calls_by(calls_log, pid, steady_to.time, recovered_mark.time)
    )
    whole = Window.between(begin, end, figures.idle_rpm, calls_by(calls_log, pid, begin.time, end.time))
    figures.steady_rpm = steady.per_minute(steady.rpcs)
    figures.steady_ticks_per_min = steady.per_minute(steady.ticks)
    figures.steady_rpcs_per_tick = steady.rpcs / steady.ticks if steady.ticks else float("nan")
    figures.cpu_s_per_min = steady.per_minute(steady.cpu)
    figures.cpu_children_s_per_min = steady.per_minute(steady.cpu_children)
    figures.run_rpm = whole.per_minute(whole.rpcs)
    figures.run_cpu_s_per_min = whole.per_minute(whole.cpu)
    figures.recovery_rpcs = recovery.rpcs
    figures.windows = {"steady": asdict(steady), "recovery": asdict(recovery), "whole": asdict(whole)}
    figures.poll_rpcs_alone = rpcs_per_poll(client, nodes, ticks)
    # The supervisor's own share, free of anything else root does meanwhile: sdiag counts
    # per user only, and on a shared test bed every engineer is root.
    figures.supervisor_rpm = figures.steady_ticks_per_min * figures.poll_rpcs_alone
    return figures


def queued_jobs() -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def idle_nodes() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--states=idle", "--format=%n"], capture_output=True, text=True)
    return len(set(out.stdout.split()))


def warm_up(root: Path) -> Path:
    """A 1-node, 2-step run whose indexed data and tokenizer the measured runs take."""
    proc = start_tiny_run(root, "warmup", 1, 2, "--set", "pipeline.eval_prompts=null", log=root / "warmup.log")
    if proc.wait(timeout=900) != 0:
        raise SystemExit(f"the warm-up run failed; see {root / 'warmup.log'}")
    return root / "warmup"


# ------------------------------------------------------------------------- report


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "n/a"


# Each column: its heading and how one row's cell reads, given the reference row (the first).
COLUMNS = (
    ("nodes", lambda f, ref: f"{f.nodes}"),
    (
        "first step s (vs ref, vs bare)",
        lambda f, ref: f"{f.launch_s:.1f} ({ratio(f.launch_s, ref.launch_s)}, {ratio(f.launch_s, f.bare_s)})",
    ),
    ("bare sbatch s", lambda f, ref: f"{f.bare_s:.2f}"),
    ("sdiag RPC/min (idle)", lambda f, ref: f"{f.steady_rpm:.1f} ({f.idle_rpm:.1f})"),
    (
        "supervisor RPC/min (vs ref)",
        lambda f, ref: f"{f.supervisor_rpm:.1f} ({ratio(f.supervisor_rpm, ref.supervisor_rpm)})",
    ),
    ("ticks/min", lambda f, ref: f"{f.steady_ticks_per_min:.2f}"),
    ("RPC/tick in run", lambda f, ref: f"{f.steady_rpcs_per_tick:.2f}"),
    (
        "RPC/poll alone (vs ref)",
        lambda f, ref: f"{f.poll_rpcs_alone:.2f} ({ratio(f.poll_rpcs_alone, ref.poll_rpcs_alone)})",
    ),
    ("CPU s/min (vs ref)", lambda f, ref: f"{f.cpu_s_per_min:.3f} ({ratio(f.cpu_s_per_min, ref.cpu_s_per_min)})"),
    (
        "recover s (vs ref; steps)",
        lambda f, ref: f"{f.recover_s:.1f} ({ratio(f.recover_s, ref.recover_s)}; {f.recover_s / f.step_s:.1f})",
    ),
    ("load 1m", lambda f, ref: f"{f.load_before[0]:.1f}-{f.load_after[0]:.1f}"),
)

LEGEND = """\
first step: command -> first training step, vs the reference row and vs N bare sbatch jobs reaching their first command.
sdiag RPC/min: this user's slurmctld RPCs in the steady training window less the idle rate measured before the run.
supervisor RPC/min: the supervisor's squeue calls per minute in that window x RPC/poll alone (not inflated by anyone else's RPCs).
ticks/min, RPC/tick in run: the supervisor's squeue calls in the window, and the sdiag RPCs per call.
RPC/poll alone: one SlurmExecutor.poll with N live jobs.  CPU s/min: the supervisor's own utime+stime in the window.
recover: scancel of a worker job -> the next logged step (in median step times of the window)."""


def report(rows: list[Figures]) -> str:
    ref = rows[0]
    cells = [[heading for heading, _ in COLUMNS]] + [[cell(f, ref) for _, cell in COLUMNS] for f in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.append(LEGEND)
    for f in rows:
        phases = ", ".join(f"{k} {v:+.1f}s" for k, v in f.recovery_phases.items())
        lines.append(
            f"{f.nodes} nodes: step {f.step_s:.2f}s; recovery event phases after the scancel: {phases}; "
            f"Slurm commands by the supervisor (whole run): {f.windows['whole']['calls']}; "
            f"whole run {f.run_rpm:.1f} sdiag RPC/min, {f.run_cpu_s_per_min:.3f} CPU s/min; "
            f"its children {f.cpu_children_s_per_min:.3f} CPU s/min (steady); peak memory +{f.peak_memory_mib:.0f} MiB"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--nodes-list", default="4,8,16", help="node counts, comma-separated; the first is the reference"
    )
    parser.add_argument("--window", type=float, default=90, help="seconds of steady training measured per run")
    parser.add_argument("--ticks", type=int, default=20, help="polls for the poll-alone figure")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes_list.split(",")]
    client = SlurmClient()
    foreign = queued_jobs()
    if foreign:
        print(
            f"warning: {len(foreign)} jobs already in the queue ({' '.join(foreign[:8])}); figures will include their load"
        )
    rows = []
    # Kept when a run fails, so its supervisor log and run directory can be read.
    root = Path(tempfile.mkdtemp(prefix="fm9g-scale-", dir=Path.home()))
    reuse = warm_up(root)
    for nodes in counts:
        rows.append(measure(root, nodes, args.window, reuse, client, args.ticks))
        print(f"{nodes} nodes measured: {json.dumps(asdict(rows[-1]))}", flush=True)
        if args.json:  # after each node count, so a failure later keeps these
            args.json.write_text(json.dumps({"figures": [asdict(f) for f in rows]}, indent=2) + "\n")
    shutil.rmtree(root)
    print(report(rows))


if __name__ == "__main__":
    main()
