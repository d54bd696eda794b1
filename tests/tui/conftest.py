"""A realistic run directory for the TUI tests, written with the real StateStore API:
config.yaml, state.db (an index stage and a 3-node train stage whose worker r2 failed
and was resubmitted), metrics.jsonl (with a partial last line), logs and events.

Times are fixed (BASE) so that elapsed times and the snapshot are stable; the tests
give the app a clock at NOW.  The live jobs can be real local jobs (`local_jobs`) for
the tests that cancel them."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fm9g.orchestrator.executors.local import LocalExecutor
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.config import RunConfig, TrainConfig, dump
from fm9g.rundir.endpoint import Endpoint, publish_endpoint

BASE = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
NOW = BASE + 3725.0
TRAIN_ITERS = 200
STEPS = 120
TASKS = ("wiki", "code", "chat")


@dataclass
class DemoRun:
    run: RunDir
    job_ids: dict[str, str]  # "r0a1" -> job id
    rows: dict[str, int] = field(default_factory=dict)  # "r0a1" -> jobs row id

    def log(self, key: str) -> Path:
        role = "master" if key.startswith("r0") else "worker"
        return self.run.stage_logs("train") / f"{role}{key[1]}-a{key[3]}.out"


def metrics_line(step: int) -> str:
    """One line as model/train.py `_report` and model/metrics.py `log_step` write it
    (with train.tensorboard_all_tasks on, so `task_loss` is there)."""
    loss = 6.0 * 0.99**step + 1.5
    record = {
        "time": BASE + 600 + 5.0 * step,
        "step": step,
        "generation": 0,
        "tokens_per_s": 12_345.0 + step,
        "tokens": 4096 * step,
        "loss": loss,
        "lr": 3e-4 * min(1.0, step / 20),
        "grad_norm": 0.8 + 0.001 * step,
        "tflops": 1.25,
        "task_loss": {task: loss + 0.1 * index for index, task in enumerate(TASKS)},
    }
    return json.dumps(record)


def make_demo_run(
    root: Path, name: str = "demo", *, owner: str | None = None, live_ids: dict[str, str] | None = None
) -> DemoRun:
    """Write runs/<name>/ under `root`; `live_ids` gives the job ids of the live jobs
    (r0a1, r1a1, r2a2), e.g. pids of real processes for the cancel test."""
    run = RunDir.of(root / name).make()
    run.config.write_text(dump(RunConfig(train=TrainConfig(train_iters=TRAIN_ITERS, model_unique=name))))
    ids = {"index": "81000", "r0a1": "81001", "r1a1": "81002", "r2a1": "81003", "r2a2": "81007"}
    ids.update(live_ids or {})
    demo = DemoRun(run=run, job_ids=ids)
    store = StateStore(run.state_db)
    try:
        store.set_meta("owner", owner or getpass.getuser())
        store.set_meta("executor", "local")
        store.set_meta("nodes", 3)
        store.upsert_stage("index", "index")
        store.upsert_stage("train", "train", depends_on=["index"])
        store.set_stage("index", "COMPLETED", detail="2 datasets indexed", progress=1.0)
        store.set_stage("train", "RUNNING", progress=STEPS / TRAIN_ITERS)
        store.db.execute("UPDATE stages SET started_at=?, ended_at=? WHERE name='index'", (BASE, BASE + 300))
        store.db.execute("UPDATE stages SET started_at=? WHERE name='train'", (BASE + 310,))

        def job(
            key: str, stage: str, role: str, rank: int, attempt: int, generation: int, log: Path, **fields: object
        ) -> None:
            log.parent.mkdir(parents=True, exist_ok=True)
            row = store.record_intent(
                stage=stage,
                role=role,
                node_rank=rank,
                attempt=attempt,
                generation=generation,
                tag=f"fm9g:{name}:{stage}:{rank}:{attempt}",
                script=str(run.scripts / f"{key}.sh"),
                script_hash="0" * 12,
                log=str(log),
            )
            store.mark_submitted(row, ids[key])
            store.update_job(row, **fields)
            store.event(
                "submitted",
                f"{role}{rank} attempt {attempt} submitted as job {ids[key]}",
                stage=stage,
                job=row,
                node_rank=rank,
                job_id=ids[key],
                generation=generation,
            )
            demo.rows[key] = row

        job(
            "index",
            "index",
            "index",
            0,
            1,
            0,
            run.stage_logs("index") / "index-a1.out",
            state="COMPLETED",
            node="cn01",
            exit_code=0,
            started_at=BASE + 5,
            ended_at=BASE + 300,
        )
        job("r0a1", "train", "master", 0, 1, 0, demo.log("r0a1"), state="RUNNING", node="cn01", started_at=BASE + 320)
        job("r1a1", "train", "worker", 1, 1, 0, demo.log("r1a1"), state="RUNNING", node="cn02", started_at=BASE + 321)
        job(
            "r2a1",
            "train",
            "worker",
            2,
            1,
            0,
            demo.log("r2a1"),
            state="NODE_FAIL",
            node="cn03",
            exit_code=None,
            reason="node lost",
            started_at=BASE + 322,
            ended_at=BASE + 1500,
        )
        job(
            "r2a2",
            "train",
            "worker",
            2,
            2,
            0,
            demo.log("r2a2"),
            state="RUNNING",
            node="cn04",
            restarts=0,
            started_at=BASE + 1530,
        )
        phases = {
            "detected": BASE + 1502.0,
            "resubmitted": BASE + 1502.4,
            "allocated": BASE + 1529.5,
            "rendezvous": BASE + 1534.0,
            "first_step": BASE + 1536.8,
        }
        store.event("stage_end", "index completed", stage="index")
        store.event(
            "failure",
            f"worker2 (job {ids['r2a1']}) ended NODE_FAIL: node lost",
            stage="train",
            job=demo.rows["r2a1"],
            klass="infrastructure",
            node="cn03",
        )
        store.event("recovery", "node 2 recovered in 34.8s", stage="train", node_rank=2, phases=phases)
        # Event times are stamped by the store; pin them so the timeline is stable.
        times = {"submitted": BASE + 1, "stage_end": BASE + 300, "failure": BASE + 1502, "recovery": BASE + 1536.8}
        for kind, when in times.items():
            store.db.execute("UPDATE events SET time=? WHERE kind=?", (when, kind))
    finally:
        store.close()
    publish_endpoint(
        run.endpoint, Endpoint(host="cn01", port=29400, generation=0, job_id=ids["r0a1"], rdzv_id=f"{name}-0")
    )
    (run.stage_logs("index") / "index-a1.out").write_text("indexed wiki: 1200 docs\nindexed code: 800 docs\n")
    for key in ("r0a1", "r1a1", "r2a1", "r2a2"):
        demo.log(key).write_text("".join(f"[{key}] step {s} loss {6.0 * 0.99**s + 1.5:.4f}\n" for s in range(1, 6)))
    with open(run.metrics, "w") as handle:
        for step in range(1, STEPS + 1):
            handle.write(metrics_line(step) + "\n")
        handle.write('{"step": 121, "loss": 2.')  # the trainer is mid-write
    return demo


INPROC_MEMBERS = ["n0r0p10", "n1r0p11", "n2r0p12"]


def add_inproc_events(run: RunDir, phase: str) -> None:
    """Membership events of a shrink recovery (node 2 lost at BASE + 2000) as the trainer
    processes write them, imported into state.db as the supervisor does.  `phase`:
    "re_formed" (the survivors formed generation 2) or "first_step" (and stepped)."""
    from fm9g.orchestrator.inproc_import import import_inproc_events

    survivors = INPROC_MEMBERS[:2]

    def line(event: str, t: float, uid: str, **fields: object) -> dict:
        return {"event": event, "t": BASE + t, "uid": uid, "node_rank": int(uid[1]), **fields}

    if phase == "re_formed":
        records = [
            *(
                line("formed", 10, uid, gen=1, rank=i, world_size=3, members=INPROC_MEMBERS)
                for i, uid in enumerate(INPROC_MEMBERS)
            ),
            *(line("detected", 2000, uid, gen=1, seq=90, applied=89, reason="peer") for uid in survivors),
            *(line("gone", 2001, uid, gen=2, uids=["n2r0p12"]) for uid in survivors),
            *(
                line("formed", 2001.5, uid, gen=2, rank=i, world_size=2, members=survivors)
                for i, uid in enumerate(survivors)
            ),
        ]
    else:
        records = [line("first_step", 2004, uid, gen=2, applied=90) for uid in survivors]
    run.inproc_events.mkdir(parents=True, exist_ok=True)
    for record in records:
        with open(run.inproc_events / f"{record['uid']}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    store = StateStore(run.state_db)
    try:
        import_inproc_events(run, store)
    finally:
        store.close()


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def demo_run(runs_root: Path) -> DemoRun:
    return make_demo_run(runs_root)


@dataclass
class LocalJobs:
    """Real local jobs (`sleep`) started through the LocalExecutor, standing in for the
    live jobs of the demo run: their ids, and the executor that can poll and kill them."""

    executor: LocalExecutor
    job_ids: dict[str, str]  # "r0a1" -> job id (the wrapper's pid)

    def alive(self, key: str) -> bool:
        return self.executor.owns(self.job_ids[key])

    def wait_ended(self, key: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(key):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture
def local_jobs(runs_root: Path) -> Iterator[LocalJobs]:
    """Three `sleep` jobs submitted with the logs the demo run names (so their exit-code
    files are where a reader looks); killed at the end whatever happened."""
    executor = LocalExecutor()
    scripts = runs_root / "demo" / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    ids = {}
    for key in ("r0a1", "r1a1", "r2a2"):
        script = scripts / f"{key}.sh"
        script.write_text("#!/bin/bash\nexec sleep 600\n")
        role = "master" if key.startswith("r0") else "worker"
        log = runs_root / "demo" / "logs" / "train" / f"{role}{key[1]}-a{key[3]}.out"
        ids[key] = executor.submit(script, log=log, tag=f"fm9g:demo:train:{key}")
    jobs = LocalJobs(executor=executor, job_ids=ids)
    try:
        yield jobs
    finally:
        for job_id in ids.values():
            executor.kill(job_id)
        executor.poll(list(ids.values()))  # reaps them


async def _settle(pilot: Pilot[None], rounds: int = 3) -> None:  # noqa: F821
    """Let the refresh workers finish and their results, and the messages they cause, land."""
    for _ in range(rounds):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settle():  # type: ignore[no-untyped-def]
    return _settle
