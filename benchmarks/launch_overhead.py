"""Launch overhead, two parts, both on the test cluster:

1. From `fm9g-launch pretrain --nodes 4 --executor slurm` to the first training step,
   against 4 bare `sbatch --wrap` jobs reaching their first command, in the same run.
   Prints the difference in seconds and the ratio.
2. A busy cluster: a blocker job holds every idle node but 2 for --blocker-seconds, then
   the same 4-node run starts with cluster.start: separate and with together.  Prints,
   for each, the node-seconds its nodes spent holding an allocation while the rest
   queued (state.db, fm9g.orchestrator.waiting) and its time to the first step, the
   blocker's hold time as the reference both are measured against.

    python benchmarks/launch_overhead.py [--repeats 2] [--blocker-seconds 30] [--skip-launch]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _slurm import bare_sbatch, first_step_time, reuse_args, start_tiny_run

from fm9g.orchestrator.waiting import run_waiting
from fm9g.rundir import RunDir
from tests.helpers.runs import wait_for as wait  # _slurm put the repository root on sys.path


def fm9g_launch(tmp: Path, nodes: int, index: int) -> float:
    start = time.time()
    proc = start_tiny_run(tmp / "runs", f"overhead{index}", nodes, 5)
    run = tmp / "runs" / f"overhead{index}"

    def first_step() -> float | None:
        if proc.poll() not in (None, 0):
            raise SystemExit(f"the run failed:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        return first_step_time(run)

    first = wait(first_step, 600, "the first training step")
    proc.wait(timeout=600)
    return first - start


def idle_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True, text=True, check=True)
    return sum(int(count) for count in out.stdout.split())


def hold_all_but(free: int, seconds: float) -> tuple[str, int]:
    """A blocker job on every idle node but `free`, RUNNING when this returns; (id, nodes)."""
    held = idle_nodes() - free
    if held < 1:
        raise SystemExit(f"the cluster has {held + free} idle nodes: nothing left to block (NODES=16 up.sh)")
    job = subprocess.run(
        ["sbatch", "--parsable", f"-N{held}", "-o", "/dev/null", f"--wrap=sleep {seconds}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    def running() -> bool:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
        return state.strip() == "RUNNING"

    wait(running, 120, "the blocker job to start")
    return job, held


def busy_run(tmp: Path, done: Path, nodes: int, start: str, blocker_seconds: float) -> tuple[float, float, float]:
    """One run while a blocker holds all idle nodes but 2: (waiting node-seconds, seconds
    to the first step, the blocker's hold from this launch)."""
    blocker, _ = hold_all_but(2, blocker_seconds)
    launched = time.time()
    name = f"busy-{start}"
    proc = start_tiny_run(tmp / "runs", name, nodes, 5, *reuse_args(done), "--set", f"cluster.start={start}")
    run = tmp / "runs" / name
    first = wait(lambda: first_step_time(run), 900, f"the first step of {name}")
    if proc.wait(timeout=900) != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
    ended = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", blocker, "-o", "End"], capture_output=True, text=True, check=True
    ).stdout.split()
    hold = time.mktime(time.strptime(ended[0], "%Y-%m-%dT%H:%M:%S")) - launched if ended else float("nan")
    return waiting_of(run), first - launched, hold


def waiting_of(run: Path) -> float:
    """The run's waiting node-seconds, as `status` reports them."""
    value = run_waiting(RunDir.of(run), time.time())
    return float("nan") if value is None else value


def busy_cluster(tmp: Path, nodes: int, blocker_seconds: float) -> None:
    prep = start_tiny_run(tmp / "runs", "prep", 1, 2)
    if prep.wait(timeout=900) != 0:
        raise SystemExit("the preparation run (index + tokenizer) failed")
    done = tmp / "runs" / "prep"
    print(f"busy cluster: a blocker holds every idle node but 2 for {blocker_seconds:.0f}s; {nodes}-node runs")
    results = {start: busy_run(tmp, done, nodes, start, blocker_seconds) for start in ("separate", "together")}
    for start, (waiting, first, hold) in results.items():
        print(
            f"  cluster.start={start:8s}  waiting {waiting:7.1f} node-s ({waiting / hold:.2f} x the blocker's "
            f"{hold:.1f}s hold)   first step after {first:6.1f}s ({first / hold:.2f} x the hold)"
        )
    separate, together = results["separate"][0], results["together"][0]
    print(f"  together saves {separate - together:.1f} node-seconds of held, idle nodes on this launch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocker-seconds", type=float, default=30.0)
    parser.add_argument("--skip-launch", action="store_true", help="only part 2 (the busy cluster)")
    args = parser.parse_args()
    bare, ours = [], []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp_name:
        tmp = Path(tmp_name)
        busy_cluster(tmp, args.nodes, args.blocker_seconds)
        if args.skip_launch:
            return
        for i in range(args.repeats):
            marks = tmp / f"bare{i}"
            marks.mkdir()
            bare.append(bare_sbatch(marks, args.nodes))
            ours.append(fm9g_launch(tmp, args.nodes, i))
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"bare sbatch x{args.nodes} to first command: {b:.2f}s (median of {args.repeats}: {', '.join(f'{x:.2f}' for x in bare)})"
    )
    print(f"fm9g-launch --nodes {args.nodes} to first step: {o:.2f}s ({', '.join(f'{x:.2f}' for x in ours)})")
    print(f"overhead: +{o - b:.2f}s, ratio {o / b:.2f}x")


if __name__ == "__main__":
    main()
