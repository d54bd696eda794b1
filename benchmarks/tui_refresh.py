"""One refresh tick of `fm9g-launch tui` on a run with 1,000 jobs, against a bare read.

    .venv/bin/python benchmarks/tui_refresh.py [--jobs 1000 --ticks 30 --changes 10]

A tick is what the TUI does every second: the data load (RunReader.load: stages, the
job rows updated since the last tick, new events, new metrics lines) plus the widget
update (MainScreen.show_view: header, training panel, jobs table, timeline).  Between
ticks a supervisor-like writer changes `--changes` job rows and logs a step, and every
job is RUNNING, so every tick rewrites every job's elapsed cell (the worst case).
The reference, measured in the same run, is a bare `SELECT * FROM jobs` on a fresh
read-only connection (what any viewer pays at least once per tick without incremental
reads).  The figure printed is ms per tick and the ratio tick / reference; the goal is
<= 100 ms per tick.  Painting the screen is reported apart (Textual paints only what is
visible, so it does not grow with the number of jobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from fm9g.orchestrator.state import StateStore
from fm9g.orchestrator.tui.app import make_app
from fm9g.orchestrator.tui.screens.main import MainScreen
from fm9g.orchestrator.views import RunReader
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig, TrainConfig, dump


def build_run(root: Path, jobs: int) -> tuple[RunDir, list[int]]:
    """A run with an index stage and a train stage of `jobs` node jobs (a tenth of them
    a second attempt after a failure), events, and 5,000 logged steps."""
    run = RunDir.of(root / "big").make()
    run.config.write_text(dump(RunConfig(train=TrainConfig(train_iters=100_000, model_unique="big"))))
    store = StateStore(run.state_db)
    now = time.time()
    rows = []
    try:
        store.set_meta("owner", "bench")
        store.set_meta("executor", "slurm")
        store.upsert_stage("index", "index")
        store.upsert_stage("train", "train", depends_on=["index"])
        store.set_stage("index", "COMPLETED")
        store.set_stage("train", "RUNNING")
        retried = jobs // 10
        nodes = jobs - retried
        with store.transaction():
            for index in range(jobs):
                rank, attempt = (index, 1) if index < nodes else (index - nodes, 2)
                row = store.record_intent(
                    stage="train",
                    role="master" if rank == 0 else "worker",
                    node_rank=rank,
                    attempt=attempt,
                    generation=0,
                    tag=f"big:{rank}:{attempt}",
                    script=f"s{index}.sh",
                    script_hash="0",
                    log=str(run.logs / f"{index}.out"),
                )
                store.mark_submitted(row, str(100_000 + index))
                failed = attempt == 1 and rank < retried
                store.update_job(
                    row,
                    state="NODE_FAIL" if failed else "RUNNING",
                    node=f"cn{rank:04d}",
                    started_at=now - 3600,
                    ended_at=now - 600 if failed else None,
                )
                rows.append(row)
            for rank in range(retried):
                store.event("failure", f"worker{rank} ended NODE_FAIL", stage="train", node_rank=rank)
                store.event(
                    "recovery",
                    f"node {rank} recovered",
                    stage="train",
                    node_rank=rank,
                    phases={
                        "detected": now - 600,
                        "resubmitted": now - 599,
                        "allocated": now - 590,
                        "rendezvous": now - 585,
                        "first_step": now - 583,
                    },
                )
        # The run has been going for an hour: its rows were last written then, not now.
        store.db.execute("UPDATE jobs SET updated_at = updated_at - 3600")
    finally:
        store.close()
    with open(run.metrics, "w") as handle:
        for step in range(1, 5001):
            handle.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 10 / step**0.3,
                        "lr": 3e-4,
                        "grad_norm": 1.0,
                        "tokens_per_s": 1e6,
                        "time": now - 5000 + step,
                        "task_loss": {"wiki": 2.0, "code": 1.5},
                    }
                )
                + "\n"
            )
    return run, rows


def bare_read(path: Path) -> float:
    start = time.perf_counter()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.execute("SELECT * FROM jobs").fetchall()
    db.close()
    return time.perf_counter() - start


async def measure(run: RunDir, rows: list[int], ticks: int, changes: int) -> dict[str, list[float]]:
    app = make_app(run.root, interval=3600, user="bench")  # the timer stays out of the way
    times: dict[str, list[float]] = {"load": [], "widgets": [], "paint": [], "reference": [], "first": []}
    writer = StateStore(run.state_db)
    async with app.run_test(size=(200, 60)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, MainScreen)
        reader = RunReader(run, time.time)
        screen.reader = reader
        start = time.perf_counter()
        screen.show_view(reader.load())
        times["first"].append(time.perf_counter() - start)
        await pilot.pause()
        for tick in range(ticks):
            for offset in range(changes):  # the supervisor's writes of one poll
                row = rows[(tick * changes + offset) % len(rows)]
                writer.update_job(row, reason=f"tick {tick}")
            with open(run.metrics, "a") as handle:
                handle.write(json.dumps({"step": 5001 + tick, "loss": 1.0, "lr": 3e-4, "time": time.time()}) + "\n")
            times["reference"].append(bare_read(run.state_db))
            start = time.perf_counter()
            view = reader.load()
            loaded = time.perf_counter()
            screen.show_view(view)
            updated = time.perf_counter()
            await pilot.pause()
            painted = time.perf_counter()
            times["load"].append(loaded - start)
            times["widgets"].append(updated - loaded)
            times["paint"].append(painted - updated)
            assert len(view.jobs) == len(rows) and len(view.changed) == changes
    writer.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--changes", type=int, default=10, help="job rows changed between ticks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, rows = build_run(Path(tmp), args.jobs)
        times = asyncio.run(measure(run, rows, args.ticks, args.changes))
    ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
    tick = ms["load"] + ms["widgets"]
    print(f"run with {args.jobs} jobs, {args.changes} changed per tick, median of {args.ticks} ticks:")
    print(f"  first tick (every row built):     {ms['first']:8.2f} ms")
    print(f"  tick = data load + widget update: {tick:8.2f} ms  (load {ms['load']:.2f} + widgets {ms['widgets']:.2f})")
    print(f"  paint after the tick:             {ms['paint']:8.2f} ms")
    print(f"  reference, bare SELECT * FROM jobs: {ms['reference']:6.2f} ms")
    print(f"  ratio tick / reference:           {tick / ms['reference']:8.2f}x")
    print(f"  goal <= 100 ms per tick: {'met' if tick <= 100 else 'MISSED'}")


if __name__ == "__main__":
    main()
