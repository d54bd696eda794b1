"""Launch overhead: from `fm9g-launch pretrain --nodes 4 --executor slurm` to the first
training step, against 4 bare `sbatch --wrap` jobs reaching their first command, in the
same run on the same cluster.  Prints the difference in seconds and the ratio.

    python benchmarks/launch_overhead.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _slurm import bare_sbatch, first_step_time, start_tiny_run

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bare, ours = [], []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp_name:
        tmp = Path(tmp_name)
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
