"""Time to recover on the test cluster, 4 nodes (3 plus a spare for the crash): from the fault to the first training step
after it (the first metrics.jsonl line logged after the fault), median over repeats, for
losing a worker, losing the master, a killed trainer and a hard node crash.  The
reference is the run's own median step time, measured in the same run.

    python benchmarks/recovery.py [--repeats 3] [--scenarios worker,master,trainer,crash]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _slurm import first_step_after, median_step_time

from tests.helpers import faults, runs  # _slurm put the repository root on sys.path

SCENARIOS = {
    "worker": faults.scancel_worker,
    "master": faults.scancel_master,
    "trainer": faults.kill_trainer,
    "crash": lambda run: faults.crash_node(run, "worker"),
}


def measure(root: Path, scenario: str, index: int, reuse: Path | None) -> tuple[float, float]:
    name = f"{scenario}{index}"
    # A crashed node needs a spare to be replaced on: 3 nodes on the 4-node test bed.
    nodes = 3 if scenario == "crash" else 4
    proc = faults.start_run(root, name, "--nodes", str(nodes), "--set", "train.train_iters=60", reuse=reuse)
    run = root / name
    runs.wait_for(lambda: runs.checkpoint_step(run) >= 8 and len(runs.live_jobs(run)) == nodes, 600, "step 8")
    # Inject right after a step was logged, so the fault lands mid-step on every repeat.
    logged = runs.last_step(run)
    runs.wait_for(lambda: runs.last_step(run) > logged, 60, "a fresh step", interval=0.01)
    fault_at = time.time()
    try:
        SCENARIOS[scenario](run)
        recovered = runs.wait_for(lambda: first_step_after(run, fault_at + 0.05), 900, "the first step after the fault")
    finally:
        if scenario == "crash":
            faults.repair_nodes()
    proc.wait(timeout=900)
    return float(recovered) - fault_at, median_step_time(run, first=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        root = Path(tmp)
        reuse = None
        for scenario in args.scenarios.split(","):
            results = []
            for i in range(args.repeats):
                results.append(measure(root, scenario, i, reuse))
                reuse = reuse or root / f"{scenario}{i}"  # later runs skip indexing and the tokenizer
            recover = statistics.median(r[0] for r in results)
            step = statistics.median(r[1] for r in results)
            print(
                f"{scenario:8s} time to recover {recover:6.1f}s (median of {args.repeats}: "
                f"{', '.join(f'{r[0]:.1f}' for r in results)}); = {recover / step:.0f} step times of {step:.2f}s"
            )


if __name__ == "__main__":
    main()
