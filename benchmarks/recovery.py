"""Time to recover on the test cluster, by recovery mode and fault, all in one run.

Modes (supervise.on_node_loss, cluster.spares):
  restart  today's path: torchrun restarts every trainer, from the last checkpoint
  wait     in-process: the survivors wait, warm, for the replacement's rank
  shrink   in-process: the survivors go on at once with fewer ranks, then grow back
  spare    in-process, wait, plus one warm spare node job (cluster.spares: 1)
  fsdp-restart, fsdp-wait, fsdp-shrink
           the same with model.fsdp: true (not run by default; pass them in --modes,
           fsdp-restart first: the others' ratio is against it)

Faults: trainer (kill -9 of one trainer rank), worker / master (scancel of that node's
job), hang (SIGSTOP of a trainer rank), crash (link down, then everything on the node
killed).  Each (mode, fault) trains the tiny 2-node run, breaks it right after a step was
logged, and reports:
  total   the fault -> the first training step logged after it
  lost    steps whose work was thrown away (the in-flight one, plus for restart the
          steps since the last checkpoint)
  phases  for in-process modes: detected, re-formed, state synced, first step, in
          seconds after the fault (from `status --json`'s inproc_recoveries)
and the ratios total / the same fault's restart total, and total / the run's median
step time (measured in the same run: the reference that absolute figures lack here).

    python benchmarks/recovery.py [--modes restart,wait,shrink,spare]
                                  [--faults trainer,worker,master,hang,crash] [--repeats 1]

Goals on this machine (issue 13): at most 5 s for every crash-type fault under shrink or
with a spare, at most 1 step lost, a hang within inproc_hang_timeout + 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _slurm import first_step_after, median_step_time

from tests.helpers import faults, runs  # _slurm put the repository root on sys.path

HANG_TIMEOUT = 2.0
MODES = {
    "restart": (),
    "wait": ("--set", "supervise.on_node_loss=wait"),
    "shrink": ("--set", "supervise.on_node_loss=shrink"),
    "spare": ("--set", "supervise.on_node_loss=wait", "--set", "cluster.spares=1"),
    # model.fsdp: the same, with the state sharded by FSDP2 (peer copies, re-sharding)
    "fsdp-restart": ("--set", "model.fsdp=true"),
    "fsdp-wait": ("--set", "supervise.on_node_loss=wait", "--set", "model.fsdp=true"),
    "fsdp-shrink": ("--set", "supervise.on_node_loss=shrink", "--set", "model.fsdp=true"),
}
DEFAULT_MODES = "restart,wait,shrink,spare"
INPROC = ("--set", f"supervise.inproc_hang_timeout={HANG_TIMEOUT:g}", "--set", "train.train_iters=60")


def member_job(run: Path, mode: str) -> runs.LiveJob:
    """A worker-side node job that trains (under spare: not the spare)."""
    jobs = [job for job in runs.live_jobs(run) if job.role == "worker" and job.node]
    if mode == "spare":
        spares = {e.data["node_rank"] for e in runs.events(run, "inproc") if e.data.get("event") == "spare"}
        jobs = [job for job in jobs if job.node_rank not in spares]
    assert jobs, "no running worker job"
    return jobs[0]


def trainer_pid(run: Path, mode: str, job: runs.LiveJob) -> int:
    if mode.endswith("restart"):
        return faults.trainer_pid(run, job.node_rank)
    files = sorted((run / "events" / "inproc").glob(f"n{job.node_rank}r0p*.jsonl"), key=lambda p: p.stat().st_mtime)
    return int(files[-1].stem.rsplit("p", 1)[1])


def inject(run: Path, mode: str, fault: str) -> None:
    if fault == "master":
        faults.scancel_master(run)
        return
    job = member_job(run, mode)
    if fault == "worker":
        subprocess.run(["scancel", job.job_id], check=True)
    elif fault == "crash":
        faults.crash_job(job)
    else:
        os.kill(trainer_pid(run, mode, job), signal.SIGKILL if fault == "trainer" else signal.SIGSTOP)


@dataclass
class Result:
    total: float
    lost: int
    step: float
    phases: dict[str, float | None]


def inproc_phases(run: Path, fault_at: float) -> dict[str, float | None]:
    out = subprocess.run(runs.cli("status", str(run), "--json"), capture_output=True, text=True)
    try:
        recoveries = json.loads(out.stdout)["runs"][0].get("inproc_recoveries") or []
    except (ValueError, KeyError, IndexError):
        return {}
    if not recoveries:
        return {}
    first = recoveries[0]
    base = first["detected_at"] - fault_at
    return {
        name: None if value is None else round(base + value, 2)
        for name, value in first["phases"].items()
        if name in ("detected", "re_formed", "state_synced", "first_step")
    } | {"path": first["path"]}


def measure(root: Path, mode: str, fault: str, index: int, reuse: Path | None) -> Result:
    name = f"{mode}-{fault}{index}"
    nodes = 2
    # today's path notices a hang only through the supervisor's watchdog (10 s at least)
    restart = mode.endswith("restart")
    watchdog = ("--set", "supervise.hang_timeout=15") if restart and fault == "hang" else ()
    proc = faults.start_run(root, name, "--nodes", str(nodes), *MODES[mode], *INPROC, *watchdog, reuse=reuse)
    run = root / name
    want = nodes + (1 if mode == "spare" else 0)
    runs.wait_for(lambda: runs.last_step(run) >= 10 and len(runs.live_jobs(run)) >= want, 600, "step 10")
    logged = runs.last_step(run)
    runs.wait_for(lambda: runs.last_step(run) > logged, 60, "a fresh step", interval=0.01)
    before = runs.last_step(run)
    fault_at = time.time()
    try:
        inject(run, mode, fault)
        recovered = runs.wait_for(lambda: first_step_after(run, fault_at + 0.05), 900, "the first step after the fault")
    finally:
        if fault == "crash":
            faults.repair_nodes()
    proc.wait(timeout=900)
    after = next(int(m["step"]) for m in runs.metrics(run) if float(m["time"]) > fault_at + 0.05)
    phases = inproc_phases(run, fault_at) if not restart else {}
    return Result(float(recovered) - fault_at, before - after + 2, median_step_time(run, first=12), phases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--faults", default="trainer,worker,master,hang,crash")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        root = Path(tmp)
        reuse: Path | None = None
        restart_totals: dict[str, float] = {}
        print(
            f"{'mode':8s} {'fault':8s} {'total':>7s} {'lost':>4s} {'x restart':>9s} {'x step':>7s}  phases (s after the fault)"
        )
        for mode in args.modes.split(","):
            for fault in args.faults.split(","):
                results = []
                for i in range(args.repeats):
                    results.append(measure(root, mode, fault, i, reuse))
                    reuse = reuse or root / f"{mode}-{fault}{i}"  # later runs skip indexing and the tokenizer
                total = statistics.median(r.total for r in results)
                step = statistics.median(r.step for r in results)
                lost = max(r.lost for r in results)
                if mode.endswith("restart"):
                    restart_totals[fault] = total
                versus = f"{total / restart_totals[fault]:9.2f}" if fault in restart_totals else f"{'-':>9s}"
                phases = results[len(results) // 2].phases
                print(
                    f"{mode:8s} {fault:8s} {total:6.2f}s {lost:4d} {versus} {total / step:7.1f}  "
                    + " ".join(f"{k}={v}" for k, v in phases.items()),
                    flush=True,
                )


if __name__ == "__main__":
    main()
