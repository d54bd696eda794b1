"""`TrainSupervisor`: submits the node jobs of a training stage and keeps them alive.

One tick = one batched poll of every live job.  A node job that ends before the run is
done is classified (failures.py) and, with repair on, only that node is resubmitted:
the surviving torchrun agents take the replacement in, or, for the master, the workers
wait for the new generation inside the allocations they hold.  Every wait is bounded;
past a bound the supervisor says why and falls back to a full restart or stops.

It never acts on a failed poll (UNKNOWN), never resubmits a job that Slurm requeued by
itself (same id, higher restart count), and records each submission before making it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from fm9g.rundir import protocol
from fm9g.rundir.endpoint import read_endpoint
from fm9g.rundir.atomic import read_json, write_text
from fm9g.rundir.config import ClusterConfig, RunConfig
from fm9g.orchestrator.jobs import JobTracker
from fm9g.orchestrator.plan import TRAIN, node_spec
from fm9g.orchestrator.failures import Failure, FailureClass, classify
from fm9g.rundir import RunDir
from fm9g.orchestrator.state import TERMINAL_STATES, JobRow, JobState, StateStore

Say = Callable[[str], None]
STAGE = TRAIN


def log_tail(path: str, size: int = 8192) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class Recovery:
    """Timeline of one repair: detected -> resubmitted -> allocated -> rendezvous -> first step."""

    id: int
    node_rank: int
    detected: float
    step_at_failure: int
    new_job_row: int | None = None
    phases: dict[str, float] = field(default_factory=dict)


class TrainSupervisor:
    def __init__(self, run: RunDir, config: RunConfig, store: StateStore, tracker: JobTracker, *,
                 say: Say, repair: bool, clock: Callable[[], float] = time.time) -> None:
        self.run = run
        self.config = config
        self.store = store
        self.tracker = tracker
        self.executor = tracker.executor
        self.say = say
        self.repair = repair
        self.clock = clock
        self.base_interval = self.executor.tick_interval(config.supervise.poll_interval)
        self.interval = self.base_interval
        self.recoveries: list[Recovery] = []
        self.continuing: set[int] = set()
        self.hang_cancelled: set[str] = set()

    # ------------------------------------------------------------------ submission
    def latest_rows(self) -> dict[int, JobRow]:
        rows: dict[int, JobRow] = {}
        for row in self.store.jobs(STAGE):
            rows[row.node_rank] = row
        return rows

    def submit_node(self, node_rank: int, *, attempt: int, generation: int, why: str) -> JobRow:
        row = self.tracker.submit(node_spec(node_rank, generation), attempt=attempt, why=why,
                                  cluster=self.cluster_config(), jobs_at_once=self.config.cluster.nodes)
        self.say(f"submitted {row.role} node {node_rank} as job {row.job_id} ({why})")
        return row

    def cluster_config(self) -> ClusterConfig:
        """The cluster section with the live node exclusions added.

        An excluded name is checked against the nodes the cluster has now (sbatch refuses a
        job over one unknown name), and exclusions that would leave too few nodes for the
        run are dropped, with an event saying so."""
        excluded = self.excluded_nodes()
        if not excluded:
            return self.config.cluster
        try:
            known = self.executor.usable_nodes()
        except Exception as exc:  # noqa: BLE001 - sinfo failing must not stop a repair
            self.store.event("exclude", f"cannot check excluded nodes against sinfo ({exc}); not excluding", stage=STAGE)
            return self.config.cluster
        if known is not None:
            excluded &= known
            if len(known - excluded - set(self.config.cluster.exclude)) < self.config.cluster.nodes:
                self.store.event("exclude", f"excluding {sorted(excluded)} would leave fewer than {self.config.cluster.nodes} nodes; not excluding", stage=STAGE)
                return self.config.cluster
        return self.config.cluster.model_copy(update={"exclude": sorted(set(self.config.cluster.exclude) | excluded)})

    def excluded_nodes(self) -> set[str]:
        now = self.clock()
        table = self.store.meta("excluded", {})
        return {node for node, until in table.items() if until > now}

    def start(self) -> None:
        """Submit every node that has no live job (a fresh stage, or a continue)."""
        self.store.upsert_stage(STAGE, "train")
        previous = self.store.stage(STAGE)
        if previous is not None and previous.status in ("FAILED", "CANCELLED"):
            # A person restarted a stopped run: its retry budgets start afresh.
            self.store.set_meta("retries_used", {})
            self.store.set_meta("checkpoint_at_failure", [])
            self.store.event("restart", f"restarting a {previous.status.lower()} training stage", stage=STAGE)
        self.refresh_live_rows()
        rows = self.latest_rows()
        live = {rank for rank, row in rows.items() if row.live}
        if len(live) == self.config.cluster.nodes:
            self.say("re-adopting the live node jobs of this run")
            self.store.set_stage(STAGE, "RUNNING")
            return
        attempt = max((row.attempt for row in rows.values()), default=0) + 1
        current = read_endpoint(self.run.endpoint)
        generation = current.generation + 1 if current else 0
        self.run.checkpoint_now_flag.unlink(missing_ok=True)
        self.run.cancel_flag.unlink(missing_ok=True)
        self.store.set_stage(STAGE, "RUNNING", detail=f"{self.config.cluster.nodes} nodes")
        for rank in range(self.config.cluster.nodes):
            if rank not in live:
                self.submit_node(rank, attempt=attempt, generation=generation, why="start")

    def refresh_live_rows(self, attempts: int = 5, sleep: Callable[[float], None] = time.sleep) -> None:
        """Before trusting the database's idea of what runs (resume, restart), ask the
        executor; a job that ended while no supervisor watched is marked ended."""
        rows = [row for row in self.latest_rows().values() if row.live and row.job_id]
        if not rows:
            return
        self.tracker.adopt(rows)
        for _ in range(attempts):
            if self.tracker.poll(STAGE) is not None and not self.tracker.unseen:
                return
            sleep(1)

    # ------------------------------------------------------------------ polling
    def tick(self) -> str | None:
        """Poll once and act; returns COMPLETED/FAILED/CANCELLED when the stage ended."""
        transitions = self.tracker.poll(STAGE)
        if transitions is None:
            return None  # a failed poll: nothing is concluded from it
        latest = {row.id for row in self.latest_rows().values()}
        for transition in transitions:
            if transition.ended and transition.after.id in latest:
                self.on_end(transition.after)
        self.track_recoveries()
        outcome = self.decide()
        self.interval = self.base_interval if transitions else min(self.interval * 1.5, self.base_interval * 8)
        return outcome

    # ------------------------------------------------------------------ decisions
    def on_end(self, row: JobRow) -> None:
        if self.run.done_flag.exists():
            return
        if row.state is JobState.COMPLETED and row.exit_code == protocol.EXIT_OK:
            return
        user_cancel = self.run.cancel_flag.exists()
        exit_code = row.exit_code
        if exit_code is None and row.job_id:
            # squeue shows an end before sacct knows its exit code; the agent wrote it down.
            record = read_json(self.run.exit_record(row.job_id))
            if isinstance(record, dict) and isinstance(record.get("code"), int):
                exit_code = record["code"]
                self.store.update_job(row.id, exit_code=exit_code)
                row = replace(row, exit_code=exit_code)
        failure = classify(row.state, exit_code, log_tail(row.log), cancelled_by_user=user_cancel)
        if row.job_id in self.hang_cancelled:
            failure = Failure(FailureClass.APP, "no training progress within supervise.hang_timeout")
        self.store.event("failure", f"{row.role}{row.node_rank} (job {row.job_id}) ended {row.state.value}: {failure.reason}",
                         stage=STAGE, job=row.id, klass=failure.klass.value, node=row.node, log=row.log)
        self.say(f"{row.role} node {row.node_rank} (job {row.job_id}) ended {row.state.value}: {failure.reason} [{failure.klass.value}]")
        if failure.klass is FailureClass.CONTINUE:
            self.continuing.add(row.node_rank)
            return
        if failure.klass is FailureClass.FATAL:
            self.stop("FAILED" if not user_cancel else "CANCELLED", failure.reason)
            return
        if not self.repair:
            step = self.run.latest_step()
            where = f"the last checkpoint is step {step}" if step is not None else "no checkpoint was written yet"
            self.stop("FAILED", f"{row.role} node {row.node_rank} (job {row.job_id}) failed: {failure.reason}; "
                                f"see {row.log}; {where}; run the same command again to resume from it")
            return
        self.repair_node(row, failure)

    def spend(self, klass: FailureClass) -> bool:
        """Take one retry from the class's budget; False when it is spent."""
        budgets = self.store.meta("retries_used", {})
        used = budgets.get(klass.value, 0)
        limit = self.config.supervise.infra_retries if klass is FailureClass.INFRA else self.config.supervise.app_retries
        if used >= limit:
            return False
        budgets[klass.value] = used + 1
        self.store.set_meta("retries_used", budgets)
        return True

    def note_node_failure(self, node: str) -> None:
        if not node or node == "localhost":
            return
        counts = self.store.meta("node_failures", {})
        counts[node] = counts.get(node, 0) + 1
        self.store.set_meta("node_failures", counts)
        if counts[node] >= self.config.supervise.exclude_after:
            table = self.store.meta("excluded", {})
            table[node] = self.clock() + self.config.supervise.exclude_for
            self.store.set_meta("excluded", table)
            self.store.event("exclude", f"excluding node {node} for {self.config.supervise.exclude_for}s after {counts[node]} failures", stage=STAGE)

    def checkpoints_stalled(self) -> bool:
        history = self.store.meta("checkpoint_at_failure", [])
        history.append(self.run.latest_step())
        self.store.set_meta("checkpoint_at_failure", history)
        window = self.config.supervise.stall_checkpoints
        tail = history[-(window + 1):]
        return len(tail) == window + 1 and len(set(tail)) == 1

    def repair_node(self, row: JobRow, failure: Failure) -> None:
        if not self.spend(failure.klass):
            self.stop("FAILED", f"the {failure.klass.value} retry budget is spent; last failure: {failure.reason} (see {row.log})")
            return
        if self.checkpoints_stalled():
            self.stop("FAILED", f"the latest checkpoint has not advanced over {self.config.supervise.stall_checkpoints} recoveries; "
                                f"last failure: {failure.reason} (see {row.log})")
            return
        self.note_node_failure(row.node)
        current = read_endpoint(self.run.endpoint)
        generation = current.generation if current else 0
        if row.role == "master":
            generation += 1
        recovery = Recovery(id=len(self.recoveries) + 1, node_rank=row.node_rank, detected=row.ended_at or self.clock(),
                            step_at_failure=self.max_heartbeat_step())
        new = self.submit_node(row.node_rank, attempt=row.attempt + 1, generation=generation,
                               why=f"repair after {failure.klass.value} failure")
        recovery.new_job_row = new.id
        recovery.phases["detected"] = recovery.detected
        recovery.phases["resubmitted"] = self.clock()
        self.recoveries.append(recovery)

    def stop(self, status: str, reason: str) -> None:
        live = [row for row in self.latest_rows().values() if row.live and row.job_id]
        self.tracker.cancel(live, reason=f"stopped: {status.lower()}")
        self.store.set_stage(STAGE, status, detail=reason)
        self.store.event("stage_end", f"train {status.lower()}: {reason}", stage=STAGE)
        self.say(f"train {status.lower()}: {reason}")

    def full_restart(self, reason: str) -> None:
        self.say(f"full restart: {reason}")
        self.store.event("full_restart", reason, stage=STAGE)
        live = [row for row in self.latest_rows().values() if row.live and row.job_id]
        self.tracker.cancel(live, reason="full restart")
        self.start()

    def decide(self) -> str | None:
        stage = self.store.stage(STAGE)
        if stage is not None and stage.status in ("FAILED", "CANCELLED", "COMPLETED"):
            return stage.status
        rows = self.latest_rows()
        ended = all(not row.live for row in rows.values())
        if self.run.done_flag.exists() and ended:
            self.store.set_stage(STAGE, "COMPLETED", detail=self.summary_line(), progress=1.0)
            self.store.event("stage_end", "train completed", stage=STAGE)
            return "COMPLETED"
        if ended and self.continuing:
            self.continuing.clear()
            self.say("every node checkpointed on request: continuing the run")
            self.store.event("continue", "all nodes checkpointed on a walltime/preemption signal; resubmitting", stage=STAGE)
            self.start()
            return None
        if ended and not self.run.done_flag.exists() and rows:
            self.stop("FAILED", "every node job ended but training did not finish; see the logs under " + str(self.run.stage_logs(STAGE)))
            return "FAILED"
        self.check_replacement_bound(rows)
        self.check_hang(rows)
        return None

    def check_replacement_bound(self, rows: dict[int, JobRow]) -> None:
        limit = self.config.supervise.replacement_timeout
        for row in rows.values():
            if row.attempt > 1 and row.state in (JobState.PENDING, JobState.SUBMITTING) and row.submitted_at and \
                    self.clock() - row.submitted_at > limit:
                self.full_restart(f"the replacement for node {row.node_rank} (job {row.job_id}) waited more than "
                                  f"{limit}s in the queue (supervise.replacement_timeout)")
                return

    def heartbeats(self) -> list[dict]:
        beats = []
        for rank in range(self.config.cluster.nodes):
            beat = read_json(self.run.heartbeat(rank))
            if isinstance(beat, dict):
                beats.append(beat)
        return beats

    def max_heartbeat_step(self) -> int:
        return max((int(b.get("step", -1)) for b in self.heartbeats()), default=-1)

    def check_hang(self, rows: dict[int, JobRow]) -> None:
        if not rows or any(row.state is not JobState.RUNNING for row in rows.values()):
            return
        limit = self.config.supervise.hang_timeout
        newest = max((float(b.get("time", 0)) for b in self.heartbeats()), default=0.0)
        started = max((row.started_at or 0.0) for row in rows.values())
        if self.clock() - max(newest, started) > limit:
            master = rows.get(0)
            if master is not None and master.job_id and master.job_id not in self.hang_cancelled:
                self.store.event("hang", f"no heartbeat progress for {limit}s: restarting the generation by replacing the master",
                                 stage=STAGE)
                self.say(f"no training progress for {limit}s: replacing the master to start a new generation")
                self.hang_cancelled.add(master.job_id)
                self.executor.cancel([master.job_id])

    def track_recoveries(self) -> None:
        """Fill in the later phases of open recoveries from job rows and heartbeats."""
        if not any(len(r.phases) < 5 for r in self.recoveries):
            return
        beats = self.heartbeats()
        for recovery in self.recoveries:
            if len(recovery.phases) >= 5 or recovery.new_job_row is None:
                continue
            row = self.store.job(recovery.new_job_row)
            if row is not None and row.started_at and "allocated" not in recovery.phases:
                recovery.phases["allocated"] = row.started_at
            started = [float(b["started"]) for b in beats if float(b.get("started", 0)) > recovery.detected]
            if started and "allocated" in recovery.phases and "rendezvous" not in recovery.phases:
                recovery.phases["rendezvous"] = min(started)
            stepped = [float(b["time"]) for b in beats
                       if float(b.get("started", 0)) > recovery.detected and int(b.get("step", -1)) > int(b.get("start_step", -1))]
            if stepped and "rendezvous" in recovery.phases:
                recovery.phases["first_step"] = min(stepped)
                self.store.event("recovery", f"node {recovery.node_rank} recovered in "
                                             f"{recovery.phases['first_step'] - recovery.detected:.1f}s",
                                 stage=STAGE, node_rank=recovery.node_rank, phases=recovery.phases)

    def summary_line(self) -> str:
        summary = read_json(self.run.summary) or {}
        if not summary:
            return "done"
        return f"step {summary.get('final_step')}, loss {summary.get('first_loss')} -> {summary.get('last_loss')}"

    def run_until_done(self, sleep: Callable[[float], None] = time.sleep) -> str:
        self.start()
        while True:
            outcome = self.tick()
            if outcome is not None:
                return outcome
            sleep(self.interval)


def write_cancel_flag(run: RunDir) -> Path:
    path = run.cancel_flag
    write_text(path, f"{time.time()}\n")
    return path
