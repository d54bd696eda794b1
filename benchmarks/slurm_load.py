"""Controller load: slurmctld RPCs caused by fm9g-launch, from `sdiag`'s per-user counts.

1. One 4-node tiny run on the test cluster: RPCs per minute while it runs, against the
   idle rate of the same user measured just before (on this single-user test bed root
   also owns slurmd's own messages, which the idle rate captures).
2. The supervisor's poll: RPCs per tick with 4 live jobs and with 16 (pending ones
   count too), showing that a tick costs the same whatever the number of jobs.

    python benchmarks/slurm_load.py [--skip-run]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _slurm import USER, idle_rate, rpcs_per_poll, start_tiny_run, user_rpcs

from fm9g.orchestrator.slurm.commands import SlurmClient


def run_load(client: SlurmClient, nodes: int, iters: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        before = user_rpcs(client)
        start = time.monotonic()
        proc = start_tiny_run(Path(tmp) / "runs", "load", nodes, iters)
        output, _ = proc.communicate(timeout=1200)
        minutes = (time.monotonic() - start) / 60
        if proc.returncode != 0:
            raise SystemExit(f"the run failed:\n{output[-3000:]}")
        total = user_rpcs(client) - before - 1
    return total, minutes, total / minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--skip-run", action="store_true", help="only the per-tick comparison")
    args = parser.parse_args()
    client = SlurmClient()
    if not args.skip_run:
        idle = idle_rate(client, 20)
        total, minutes, rate = run_load(client, args.nodes, args.iters)
        print(
            f"{args.nodes}-node run: {total} RPCs by {USER} in {minutes:.2f} min = {rate:.1f}/min; "
            f"idle rate {idle:.1f}/min; attributable to the run {rate - idle:.1f}/min"
        )
    small = rpcs_per_poll(client, 4, args.ticks)
    large = rpcs_per_poll(client, 16, args.ticks)
    print(
        f"RPCs per poll tick: {small:.2f} with 4 jobs, {large:.2f} with 16 jobs (ratio {large / small if small else float('nan'):.2f})"
    )


if __name__ == "__main__":
    main()
