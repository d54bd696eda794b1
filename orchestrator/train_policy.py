"""`TrainPolicy`: the repair policy of a training stage, the one place that decides what
happens when a node job ends before the run is done.

Mechanics live elsewhere: `jobs.JobTracker` submits, polls and records rows and the
`submitted`, `requeued_by_slurm` and `poll_error` events; `recovery` keeps the timeline
of each repair; `failures.classify` names the class (and so the budget) of an end.
"""

from __future__ import annotations

import enum
import shlex
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fm9g.orchestrator.failures import Failure, FailureClass, classify
from fm9g.orchestrator.inproc_import import LOSS_EVENTS, import_inproc_events
from fm9g.orchestrator.inproc_losses import LOST_SIGNS, lost_nodes
from fm9g.orchestrator.inproc_recoveries import INPROC_KIND
from fm9g.orchestrator.jobs import JobTracker, log_tail
from fm9g.orchestrator.plan import STORE, TRAIN, StageKind, inproc_recovery, node_slots, node_spec, together_spec
from fm9g.orchestrator.recovery import Heartbeat, RecoveryTimeline, read_heartbeats
from fm9g.orchestrator.state import JobRow, JobState, StageStatus, StateStore
from fm9g.orchestrator.store_job import StoreKeeper
from fm9g.orchestrator.waiting import stage_waiting
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.atomic import read_json
from fm9g.rundir.config import ClusterConfig, RunConfig
from fm9g.rundir.endpoint import read_endpoint

Say = Callable[[str], None]
Clock = Callable[[], float]
Sleep = Callable[[float], None]
STAGE = TRAIN

# Keys of the policy's durable state in state.db's meta table (kept across `resume`).
RETRIES_USED = "retries_used"  # {FailureClass value: retries spent}
NODE_FAILURES = "node_failures"  # {node name: failures seen on it}
EXCLUDED = "excluded"  # {node name: excluded until (epoch seconds)}
CHECKPOINT_AT_FAILURE = "checkpoint_at_failure"  # [latest checkpoint step at each repair]


DONE_GRACE_S = 30.0  # a node job still running this long after DONE has nothing left to do


class NodeRole(str, enum.Enum):
    """The role of a training node job (plan.node_spec: rank 0 is the master)."""

    MASTER = "master"  # hosts the rendezvous store and publishes the endpoint's generation
    WORKER = "worker"


def _quiet(_: str) -> None:
    pass


class TrainPolicy:
    """Keeps the node jobs of the training stage alive, or stops the stage saying why.

    Job rows.  One row per submission attempt of each node rank (0 = master); the newest
    row of each rank is the node's current job.  `start` submits a job for every rank that
    has no live one (attempt = the highest so far + 1; generation = the endpoint's + 1),
    or re-adopts them when all are live.  Each `tick` polls once through the tracker; the
    newest rows that ended this tick go to `on_end`, then `decide` looks at all of them.

    An end (`on_end`) is ignored once control/DONE exists or when it exited 0.  Otherwise
    it is classified (exit code, Slurm state, log tail, control/cancel, control/fatal.json)
    and written as a `failure` event (klass, node_rank, role, job_id, state, exit_code,
    node, log), then:
      - continue (exit 75, checkpointed on a signal): nothing now; once every node ended,
        a `continue` event and a fresh start of every node, paid by no budget;
      - do-not-retry (exit 78, user cancel): stop FAILED (CANCELLED for a user cancel);
      - with repair off (`repairs`): stop FAILED, naming the log and the last checkpoint;
      - infrastructure or application: `repair_node`, which takes one retry from that
        class's budget (supervise.infra_retries / app_retries, counted in state.db across
        resumes; a restart of a FAILED or CANCELLED stage, with a `restart` event, refills
        them), stops FAILED when it is spent or when the latest checkpoint did not advance
        over supervise.stall_checkpoints repairs, counts the failure against the node
        (an `exclude` event once it failed supervise.exclude_after times: later
        submissions avoid it for supervise.exclude_for seconds, unless that would leave
        too few usable nodes, also an `exclude` event), and resubmits that node alone.  A
        master's replacement gets generation + 1; workers join the generation that runs.
        Its timeline opens in `recovery` and ends in a `recovery` event.

    A job Slurm requeued by itself (same id, restarts + 1; or any NODE_FAIL/PREEMPTED with
    cluster.requeue) is no end: the tracker writes `requeued_by_slurm` and nothing is
    resubmitted.  A failed poll is a `poll_error` event and nothing else; a job the poll
    cannot see (UNKNOWN) is never acted on, and no watchdog acts in such a tick.

    Watchdogs (`decide`, every tick the stage still runs):
      - a replacement that waited in the queue past supervise.replacement_timeout while
        the other nodes hold their allocations: a `full_restart` event, every live job
        cancelled, every node submitted again (no budget: the repair was paid for);
      - every node RUNNING with no heartbeat progress within supervise.hang_timeout: a
        `hang` event and the master's job cancelled; its end is an application failure
        and its repair (a new generation) pays from the application budget.

    In-process recovery (supervise.on_node_loss wait/shrink, `plan.inproc_recovery`).
    The stage has node_slots = cluster.nodes + cluster.spares node jobs (ranks nodes.. are
    spares: ordinary worker jobs whose ranks wait warm; the trainers' own membership
    decides who trains), and a store job that `keeper` (store_job.StoreKeeper) submits
    before any node and keeps alive: its rows are of stage "store", polled in the same
    executor poll as the nodes', and never one of this stage's node rows (latest_rows,
    ends, watchdogs, heartbeats, waiting node-seconds read stage "train" only).  A
    master's replacement keeps the generation: no torchrun endpoint is used.  Waiting
    node-seconds still count against cluster.nodes: the stage trains once that many
    nodes hold allocations, spares or not.

    It stops (`stop`: a `stage_end` event with the waiting node-seconds, live jobs
    cancelled, the store job's included, the stage row's status)
    COMPLETED once control/DONE exists and every node ended; FAILED when every node ended
    without DONE, on a do-not-retry end, a spent budget, stalled checkpoints or an end
    with repair off; CANCELLED on control/cancel (the user's `fm9g-launch cancel`).
    """

    def __init__(
        self,
        run: RunDir,
        config: RunConfig,
        store: StateStore,
        tracker: JobTracker,
        *,
        say: Say = _quiet,
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.run = run
        self.config = config
        self.store = store
        self.tracker = tracker
        self.executor = tracker.executor
        self.say = say
        self.clock = clock
        self.sleep = sleep
        self.base_interval = self.executor.tick_interval(config.supervise.poll_interval)
        self.interval = self.base_interval
        self.timeline = RecoveryTimeline(store, STAGE)
        self.hang_cancelled: set[int] = set()  # master job rows the hang watchdog cancelled
        self.silent_cancelled: set[int] = set()  # node job rows cancelled as silent (cancel_silent_nodes)
        self.inproc_seen = 0  # the last `inproc` event id cancel_silent_nodes has read
        self.loss_records: list[dict[str, Any]] = []  # its `arrived`, `gone` and `rank_exit` records so far
        # Allocations (cluster.start: together) whose end was paid for this tick: the
        # nodes of one allocation that ended together are one failure, not N.
        self.paid_allocations: set[str] = set()
        self.keeper = StoreKeeper(run, config, store, tracker, self.cluster_config, say=say, clock=clock)
        self.slots = node_slots(config)  # node jobs kept running: nodes (+ spares)
        # What each tick polls: the node jobs, and the store job's under in-process recovery.
        self.polled: str | tuple[str, ...] = (STAGE, STORE) if inproc_recovery(config) else STAGE

    @property
    def repairs(self) -> bool:
        """Whether a failed node is resubmitted: always on Slurm; with the local executor
        only when supervise.repair_local says so (a local failure is usually the program's,
        so by default it stops with a message naming the checkpoint to resume from)."""
        return self.config.executor == "slurm" or self.config.supervise.repair_local

    # ------------------------------------------------------------------ jobs
    def latest_rows(self) -> dict[int, JobRow]:
        """The newest job row of each node rank."""
        return {row.node_rank: row for row in self.store.jobs(STAGE)}

    def submit_node(self, node_rank: int, *, attempt: int, generation: int, why: str) -> JobRow:
        """Submit one node's job through the tracker, with the live node exclusions."""
        row = self.tracker.submit(
            node_spec(node_rank, generation),
            attempt=attempt,
            why=why,
            cluster=self.cluster_config(),
            jobs_at_once=self.slots,
        )
        self.say(f"submitted {row.role} node {node_rank} as job {row.job_id} ({why})")
        return row

    def submit_together(self, ranks: list[int], *, attempt: int, generation: int, why: str) -> list[JobRow]:
        """Submit the nodes `ranks` (every node of the stage) as one allocation."""
        rows = self.tracker.submit_together(
            together_spec(self.run, len(ranks), generation),
            [node_spec(rank, generation) for rank in ranks],
            attempt=attempt,
            why=why,
            cluster=self.cluster_config(),
        )
        self.say(
            f"submitted {len(rows)} nodes as one allocation, job {rows[0].job_id} ({why}; cluster.start: together)"
        )
        return rows

    def allocation_ids(self) -> set[str]:
        """Job ids shared by several node rows: the multi-node allocations of this stage."""
        counts = Counter(row.job_id for row in self.store.jobs(STAGE) if row.job_id)
        return {job_id for job_id, count in counts.items() if count > 1}

    def in_allocation(self, row: JobRow) -> bool:
        """Whether `row` is one node of a multi-node allocation (its job id is shared)."""
        return bool(row.job_id) and row.job_id in self.allocation_ids()

    def node_ends(self, shared: set[str]) -> list[JobRow]:
        """Nodes of a running allocation whose own end is on record (the agent's exit
        record, or the allocation script's for a node that died): ended now, though
        the job itself runs on.  Also gives each such row its host, from its step record."""
        ended = []
        for row in self.live_latest():
            if row.job_id not in shared:
                continue
            assert row.job_id is not None
            step = read_json(self.run.step_record(row.job_id, row.node_rank)) or {}
            if step.get("host") and row.node != step["host"]:
                self.store.update_job(row.id, node=str(step["host"]))
            path = self.run.exit_record(row.job_id, row.node_rank)
            recorded = protocol.read_exit_code(path)
            if recorded is None:
                continue
            code, when = recorded
            if (read_json(path) or {}).get("by") == "allocation":
                # The agent wrote nothing: its node failed or it was killed.  srun's own
                # status says little (22.05 exits 0 after "Node failure on nodeK").
                self.store.update_job(
                    row.id,
                    state=JobState.NODE_FAIL,
                    exit_code=code or None,
                    ended_at=when,
                    reason=f"the node agent on {row.node or 'its node'} ended without a word (srun exit {code})",
                )
            else:
                state = JobState.COMPLETED if code == protocol.EXIT_OK else JobState.FAILED
                self.store.update_job(row.id, state=state, exit_code=code, ended_at=when, reason="its step ended")
            after = self.store.job(row.id)
            assert after is not None
            ended.append(after)
        return ended

    def nodes_lost(self, shared: set[str]) -> list[JobRow]:
        """Nodes of a running allocation that left it: Slurm drops a failed node from a
        --no-kill job and the job runs on, and a node whose host died (the batch host
        included) has no step left to report its end."""
        from fm9g.orchestrator.slurm.parse import expand_hostlist

        lost = []
        for row in self.live_latest():
            status = self.tracker.last_statuses.get(row.job_id or "")
            if status is None or status.state is not JobState.RUNNING or not status.held:
                continue
            if not row.node or row.job_id not in shared:
                continue
            if row.node in expand_hostlist(status.held):
                continue
            self.store.update_job(
                row.id,
                state=JobState.NODE_FAIL,
                ended_at=self.clock(),
                reason=f"{row.node} left allocation {row.job_id} (node failure)",
            )
            after = self.store.job(row.id)
            assert after is not None
            lost.append(after)
        return lost

    def release_allocation_node(self, row: JobRow) -> None:
        """Give a replaced node's host back to the cluster while its allocation runs on
        (best effort: a node that died has already left the allocation).  Never rank 0's
        host: the allocation's batch script runs there."""
        if not row.job_id or not row.node or row.node_rank == 0:
            return
        try:
            released = self.executor.release_node(row.job_id, row.node)
            message = f"released {row.node} from allocation {row.job_id}: node {row.node_rank} runs in its replacement"
        except Exception as exc:  # noqa: BLE001 - the repair itself has been made
            released, message = False, f"could not release {row.node} from job {row.job_id}: {exc}"
        else:
            if not released:
                return  # the node had left the job already (a failed node)
        self.store.event(
            "release_node",
            message,
            stage=STAGE,
            job=row.id,
            node=row.node,
            job_id=row.job_id,
            released=released,
        )

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
            self.store.event(
                "exclude",
                f"cannot check excluded nodes against sinfo ({exc}); not excluding",
                stage=STAGE,
                nodes=sorted(excluded),
                applied=False,
            )
            return self.config.cluster
        if known is not None:
            excluded &= known
            if len(known - excluded - set(self.config.cluster.exclude)) < self.slots:
                self.store.event(
                    "exclude",
                    f"excluding {sorted(excluded)} would leave fewer than {self.slots} nodes; not excluding",
                    stage=STAGE,
                    nodes=sorted(excluded),
                    applied=False,
                )
                return self.config.cluster
        return self.config.cluster.model_copy(update={"exclude": sorted(set(self.config.cluster.exclude) | excluded)})

    def excluded_nodes(self) -> set[str]:
        """Nodes whose exclusion has not expired."""
        now = self.clock()
        return {node for node, until in self.store.meta(EXCLUDED, {}).items() if until > now}

    def start(self, why: str = "start") -> None:
        """Submit every node that has no live job (a fresh stage, a continue, a full restart)."""
        self.store.upsert_stage(STAGE, StageKind.TRAIN.value)
        previous = self.store.stage(STAGE)
        if previous is not None and previous.status in (StageStatus.FAILED, StageStatus.CANCELLED):
            # A person restarted a stopped run: its retry budgets start afresh.
            self.store.set_meta(RETRIES_USED, {})
            self.store.set_meta(CHECKPOINT_AT_FAILURE, [])
            self.store.event(
                "restart",
                f"restarting a {previous.status.value.lower()} training stage",
                stage=STAGE,
                previous=previous.status.value,
            )
        self.refresh_live_rows()
        rows = self.latest_rows()
        live = {rank for rank, row in rows.items() if row.live}
        if len(live) == self.slots:
            self.keeper.ensure(why)
            self.say("re-adopting the live node jobs of this run")
            self.store.set_stage(STAGE, StageStatus.RUNNING)
            return
        attempt = max((row.attempt for row in rows.values()), default=0) + 1
        generation = self.start_generation(rows, live)
        self.run.checkpoint_now_flag.unlink(missing_ok=True)
        self.run.cancel_flag.unlink(missing_ok=True)
        # The node agent exits 78 at once while fatal.json exists: a new start is the
        # user's word that the cause was fixed (the reason stays in the failure event).
        self.run.fatal_record.unlink(missing_ok=True)
        # The store first (after the flags it would read are gone): the ranks need it to form.
        self.keeper.ensure(why)
        self.store.set_stage(STAGE, StageStatus.RUNNING, detail=f"{self.config.cluster.nodes} nodes")
        missing = [rank for rank in range(self.slots) if rank not in live]
        if self.config.cluster.start == "together" and not live and len(missing) > 1:
            self.submit_together(missing, attempt=attempt, generation=generation, why=why)
            return
        for rank in missing:
            self.submit_node(rank, attempt=attempt, generation=generation, why=why)

    def start_generation(self, rows: dict[int, JobRow], live: set[int]) -> int:
        """The generation the nodes of a (re)start carry.  torchrun's rendezvous: one past
        the published endpoint's.  In-process recovery: a session number the ranks scope
        their store keys with, so a continue or restart never meets an earlier session's
        groups; it moves on only when no node of the last session is left."""
        if inproc_recovery(self.config):
            if live:
                return max(rows[rank].generation for rank in live)
            return max((row.generation for row in rows.values()), default=-1) + 1
        current = read_endpoint(self.run.endpoint)
        return current.generation + 1 if current else 0

    def live_latest(self) -> list[JobRow]:
        """Each node's newest job row, where that job is submitted and has not ended."""
        return [row for row in self.latest_rows().values() if row.live and row.job_id]

    def refresh_live_rows(self, attempts: int = 5) -> None:
        """Before trusting the database's idea of what runs (resume, restart), ask the
        executor; a job that ended while no supervisor watched is marked ended."""
        store_job = self.keeper.live()
        rows = self.live_latest() + ([store_job] if store_job is not None else [])
        if not rows:
            return
        self.tracker.adopt(rows)
        for _ in range(attempts):
            if self.tracker.poll(self.polled) is not None and not self.tracker.unseen:
                return
            self.sleep(1)

    # ------------------------------------------------------------------ one tick
    def tick(self) -> StageStatus | None:
        """Poll once and act; the stage's final status once it ended, else None."""
        self.paid_allocations = set()
        shared = self.allocation_ids()  # once per tick: the multi-node allocations' job ids
        node_ends = self.node_ends(shared)  # before the poll: a node's own code beats its job's
        transitions = self.tracker.poll(self.polled)
        if transitions is None:
            return None  # a failed poll: nothing is concluded from it
        latest = {row.id for row in self.latest_rows().values()}
        for row in [*node_ends, *self.nodes_lost(shared)]:
            if row.id in latest:
                self.on_end(row)
        for transition in transitions:
            if transition.requeued:
                self.say(f"job {transition.after.job_id} was requeued by Slurm; not resubmitting it")
            if transition.ended and transition.after.id in latest:
                self.on_end(transition.after)
        beats = read_heartbeats(self.run, self.slots)  # once per tick, for every check
        self.timeline.track(beats)
        outcome = self.decide(beats)
        if outcome is None:
            lost = self.keeper.follow()  # a lost store is submitted again at once
            if lost is not None:
                self.stop(StageStatus.FAILED, lost)
                outcome = StageStatus.FAILED
        changed = transitions or node_ends
        self.interval = self.base_interval if changed else min(self.interval * 1.5, self.base_interval * 8)
        if import_inproc_events(self.run, self.store, counting=LOSS_EVENTS):  # a peer lost, told in-band:
            self.interval = self.base_interval  # poll at once for its job's end and the replacement
        if outcome is None and inproc_recovery(self.config):
            self.cancel_silent_nodes()
        return outcome

    def cancel_silent_nodes(self) -> None:
        """Cancel the job of a node its peers reported gone while its agent said nothing
        (inproc_losses), and repair it at once like any lost node, long before Slurm
        would call it NODE_FAIL."""
        # Only the events imported since the last tick are read: the rest are kept here.
        fresh = self.store.events(INPROC_KIND, since_id=self.inproc_seen)
        if fresh:
            self.inproc_seen = fresh[-1].id
            self.loss_records += [event.data for event in fresh if event.data.get("event") in LOST_SIGNS]
        records = self.loss_records
        if not records:
            return
        rows = self.latest_rows()
        for lost in lost_nodes(records, self.clock()):
            row = rows.get(lost.node_rank)
            if row is None or not row.live or not row.job_id or row.id in self.silent_cancelled:
                continue
            if row.started_at is None or row.started_at > lost.joined:
                continue  # started after the lost process joined: a replacement, not its host
            self.silent_cancelled.add(row.id)
            self.interval = self.base_interval
            self.store.event(
                "node_silent",
                f"node {lost.node_rank}'s rank {lost.uid} went silent and its agent said nothing: "
                f"cancelling job {row.job_id} to replace it now",
                stage=STAGE,
                job=row.id,
                node_rank=lost.node_rank,
                job_id=row.job_id,
                uid=lost.uid,
                since=lost.since,
            )
            self.say(f"node {lost.node_rank} (job {row.job_id}) went silent: replacing it")
            # Ended now, not when Slurm confirms it: a job on a dead node stays RUNNING until
            # the controller gives up on the node (SlurmdTimeout), and the survivors (under
            # wait) are waiting for the replacement meanwhile.
            self.tracker.cancel([row], reason="its ranks went silent")
            ended = self.store.job(row.id)
            if ended is not None:
                self.on_end(ended)

    def run_until_done(self) -> StageStatus:
        """Start (or re-adopt) the nodes and tick until the stage ends; its final status."""
        self.start()
        while True:
            outcome = self.tick()
            if outcome is not None:
                return outcome
            self.sleep(self.interval)

    # ------------------------------------------------------------------ decisions
    def classify_end(self, row: JobRow, cancelled_by_user: bool) -> tuple[JobRow, Failure]:
        """Why `row` ended: its class and reason (the row comes back with the agent's exit code)."""
        exit_code = row.exit_code
        if (exit_code is None or self.in_allocation(row)) and row.job_id:
            # squeue shows an end before sacct knows its exit code; the agent wrote it down.
            # A node of an allocation has its own record: the job's code is the script's.
            rank = row.node_rank if self.in_allocation(row) else None
            recorded = protocol.read_exit_code(self.run.exit_record(row.job_id, rank))
            if recorded is not None:
                exit_code = recorded[0]
                self.store.update_job(row.id, exit_code=exit_code)
                row = replace(row, exit_code=exit_code)
        if row.id in self.hang_cancelled:
            return row, Failure(FailureClass.APP, "no training progress within supervise.hang_timeout")
        if row.id in self.silent_cancelled:
            return row, Failure(
                FailureClass.INFRA, "its ranks went silent and its agent with them (link down, or the node froze)"
            )
        return row, classify(
            row.state,
            exit_code,
            log_tail(row.log),
            cancelled_by_user=cancelled_by_user,
            fatal_reason=self.run.read_fatal(),
            run_name=shlex.quote(str(self.run.root)),
        )

    def on_end(self, row: JobRow) -> None:
        """A node's newest job ended: write the failure and continue, stop or repair."""
        if self.run.done_flag.exists():
            return
        if row.state is JobState.COMPLETED and row.exit_code == protocol.EXIT_OK:
            return
        user_cancel = self.run.cancel_flag.exists()
        row, failure = self.classify_end(row, user_cancel)
        self.store.event(
            "failure",
            f"{row.role}{row.node_rank} (job {row.job_id}) ended {row.state.value}: {failure.reason}",
            stage=STAGE,
            job=row.id,
            klass=failure.klass.value,
            reason=failure.reason,
            node_rank=row.node_rank,
            role=row.role,
            job_id=row.job_id,
            state=row.state.value,
            exit_code=row.exit_code,
            node=row.node,
            log=row.log,
        )
        self.say(
            f"{row.role} node {row.node_rank} (job {row.job_id}) ended {row.state.value}: {failure.reason} "
            f"[{failure.klass.value}]"
        )
        if failure.klass is FailureClass.CONTINUE:
            return  # decide() continues the run once every node has ended
        if failure.klass is FailureClass.FATAL:
            self.stop(StageStatus.CANCELLED if user_cancel else StageStatus.FAILED, failure.reason)
            return
        if not self.repairs:
            step = self.run.latest_step()
            where = f"the last checkpoint is step {step}" if step is not None else "no checkpoint was written yet"
            self.stop(
                StageStatus.FAILED,
                f"{row.role} node {row.node_rank} (job {row.job_id}) failed: {failure.reason}; "
                f"see {row.log}; {where}; run the same command again to resume from it",
            )
            return
        self.repair_node(row, failure)

    def spend(self, klass: FailureClass) -> bool:
        """Take one retry from the class's budget; False when it is spent."""
        budgets = self.store.meta(RETRIES_USED, {})
        used = budgets.get(klass.value, 0)
        supervise = self.config.supervise
        limit = supervise.infra_retries if klass is FailureClass.INFRA else supervise.app_retries
        if used >= limit:
            return False
        budgets[klass.value] = used + 1
        self.store.set_meta(RETRIES_USED, budgets)
        return True

    def note_node_failure(self, node: str) -> None:
        """Count a failure against `node`; exclude it once it reaches supervise.exclude_after."""
        if not node or node == "localhost":
            return
        counts = self.store.meta(NODE_FAILURES, {})
        counts[node] = counts.get(node, 0) + 1
        self.store.set_meta(NODE_FAILURES, counts)
        if counts[node] >= self.config.supervise.exclude_after:
            table = self.store.meta(EXCLUDED, {})
            table[node] = self.clock() + self.config.supervise.exclude_for
            self.store.set_meta(EXCLUDED, table)
            self.store.event(
                "exclude",
                f"excluding node {node} for {self.config.supervise.exclude_for}s after {counts[node]} failures",
                stage=STAGE,
                nodes=[node],
                applied=True,
                failures=counts[node],
                until=table[node],
            )

    def checkpoints_stalled(self) -> bool:
        """Record the latest checkpoint at this repair; True when it has not moved over
        the last supervise.stall_checkpoints repairs."""
        history = self.store.meta(CHECKPOINT_AT_FAILURE, [])
        history.append(self.run.latest_step())
        self.store.set_meta(CHECKPOINT_AT_FAILURE, history)
        window = self.config.supervise.stall_checkpoints
        tail = history[-(window + 1) :]
        return len(tail) == window + 1 and len(set(tail)) == 1

    def repair_node(self, row: JobRow, failure: Failure) -> None:
        """Pay for the failure from its budget and resubmit that node alone, or stop."""
        shared = self.in_allocation(row)
        if shared and row.job_id in self.paid_allocations:
            self.resubmit(row, failure)  # another node of this allocation paid this tick
            return
        if shared and row.job_id:
            self.paid_allocations.add(row.job_id)
        if not self.spend(failure.klass):
            self.stop(
                StageStatus.FAILED,
                f"the {failure.klass.value} retry budget is spent; last failure: {failure.reason} (see {row.log})",
            )
            return
        if self.checkpoints_stalled():
            self.stop(
                StageStatus.FAILED,
                f"the latest checkpoint has not advanced over "
                f"{self.config.supervise.stall_checkpoints} recoveries; "
                f"last failure: {failure.reason} (see {row.log})",
            )
            return
        self.note_node_failure(row.node)
        self.resubmit(row, failure)

    def resubmit(self, row: JobRow, failure: Failure) -> None:
        """Submit node `row.node_rank` again, alone, and open its recovery timeline."""
        current = read_endpoint(self.run.endpoint)
        generation = current.generation if current else 0
        if inproc_recovery(self.config):
            generation = row.generation  # the same session: the replacement joins its peers' groups
        elif NodeRole(row.role) is NodeRole.MASTER:
            generation += 1  # a new store, a new rdzv id: the workers follow the newer endpoint
        detected = row.ended_at or self.clock()
        step = max((beat.step for beat in read_heartbeats(self.run, self.slots)), default=-1)
        new = self.submit_node(
            row.node_rank,
            attempt=row.attempt + 1,
            generation=generation,
            why=f"repair after {failure.klass.value} failure",
        )
        self.timeline.open(
            node_rank=row.node_rank,
            new_job_row=new.id,
            step_at_failure=step,
            detected=detected,
            resubmitted=self.clock(),
        )
        if self.in_allocation(row):
            self.release_allocation_node(row)

    def stop(self, status: StageStatus, reason: str) -> None:
        """End the stage with `status`: cancel its live jobs and write a stage_end event."""
        live = self.live_latest()
        ids = self.tracker.cancel(live, reason=f"stopped: {status.value.lower()}")
        ids += self.keeper.cancel(f"stopped: {status.value.lower()}")
        self.store.set_stage(STAGE, status, detail=reason)
        self.store.event(
            "stage_end",
            f"train {status.value.lower()}: {reason}",
            stage=STAGE,
            status=status.value,
            reason=reason,
            cancelled=ids,
            waiting_node_s=self.waiting(),
        )
        self.say(f"train {status.value.lower()}: {reason}")

    def full_restart(self, reason: str, node_rank: int) -> None:
        """Cancel every live node job and submit them all again."""
        self.say(f"full restart: {reason}")
        self.store.event("full_restart", reason, stage=STAGE, node_rank=node_rank)
        live = self.live_latest()
        self.tracker.cancel(live, reason="full restart")
        self.start(why="full restart")

    def decide(self, beats: list[Heartbeat]) -> StageStatus | None:
        """After this tick's ends: the stage's final status, or None while it runs on."""
        stage = self.store.stage(STAGE)
        if stage is not None and stage.status in (StageStatus.FAILED, StageStatus.CANCELLED, StageStatus.COMPLETED):
            return stage.status
        if self.run.cancel_flag.exists():
            self.stop(StageStatus.CANCELLED, "cancelled by the user (control/cancel)")
            return StageStatus.CANCELLED
        rows = self.latest_rows()
        if self.run.done_flag.exists():
            self.cancel_leftovers(rows)
            rows = self.latest_rows()
        ended = bool(rows) and all(not row.live for row in rows.values())
        if ended and self.run.done_flag.exists():
            self.keeper.cancel("training completed")  # it exits by itself on DONE; no waiting for it
            self.store.set_stage(STAGE, StageStatus.COMPLETED, detail=self.summary_line(), progress=1.0)
            self.store.event(
                "stage_end",
                "train completed",
                stage=STAGE,
                status=StageStatus.COMPLETED.value,
                waiting_node_s=self.waiting(),
            )
            return StageStatus.COMPLETED
        continuing = sorted(rank for rank, row in rows.items() if row.exit_code == protocol.EXIT_CONTINUE)
        if ended and continuing:
            self.say("every node checkpointed on request: continuing the run")
            self.store.event(
                "continue",
                "all nodes checkpointed on a walltime/preemption signal; resubmitting",
                stage=STAGE,
                node_ranks=continuing,
            )
            self.start(why="continue")
            return None
        if ended:
            self.stop(
                StageStatus.FAILED,
                "every node job ended but training did not finish; see the logs under "
                + str(self.run.stage_logs(STAGE)),
            )
            return StageStatus.FAILED
        if self.tracker.unseen & {row.id for row in rows.values()}:
            return None  # a node job this poll could not see may be fine: no watchdog acts on it
        if self.check_replacement_bound(rows):
            return None
        self.check_hang(rows, beats)
        return None

    def cancel_leftovers(self, rows: dict[int, JobRow]) -> None:
        """Training is done: cancel node jobs that have nothing left to do.  A replacement
        still queued would start only to find the run over; a job still running
        DONE_GRACE_S after DONE is stuck (a frozen spare: a live one leaves at once)."""
        done_at = self.run.done_flag.stat().st_mtime if self.run.done_flag.exists() else self.clock()
        live = [row for row in rows.values() if row.live and row.job_id]
        queued = [row for row in live if row.started_at is None]
        if queued and len(queued) < len(rows):
            self.tracker.cancel(queued, reason="training completed before it started")
        stuck = [row for row in live if row.started_at is not None and self.clock() - done_at > DONE_GRACE_S]
        if stuck:
            self.say(f"training is done but {len(stuck)} node job(s) did not exit in {DONE_GRACE_S:g}s: cancelling")
            self.tracker.cancel(stuck, reason=f"still running {DONE_GRACE_S:g}s after training completed")

    def check_replacement_bound(self, rows: dict[int, JobRow]) -> bool:
        """A full restart when a replacement waited past supervise.replacement_timeout
        while other nodes hold their allocations; True when it restarted."""
        limit = self.config.supervise.replacement_timeout
        for row in rows.values():
            waiting = row.state in (JobState.PENDING, JobState.SUBMITTING)
            holding = any(other.state is JobState.RUNNING for other in rows.values() if other.id != row.id)
            if holding and row.attempt > 1 and waiting and row.submitted_at and self.clock() - row.submitted_at > limit:
                self.full_restart(
                    f"the replacement for node {row.node_rank} (job {row.job_id}) waited more than "
                    f"{limit}s in the queue (supervise.replacement_timeout)",
                    row.node_rank,
                )
                return True
        return False

    def check_hang(self, rows: dict[int, JobRow], beats: list[Heartbeat]) -> None:
        """Cancel the master (a new generation follows) when every node runs but no
        heartbeat moved within supervise.hang_timeout."""
        if not rows or any(row.state is not JobState.RUNNING for row in rows.values()):
            return
        limit = self.config.supervise.hang_timeout
        newest = max((beat.time for beat in beats), default=0.0)
        started = max((row.started_at or 0.0) for row in rows.values())
        if self.clock() - max(newest, started) <= limit:
            return
        master = rows.get(0)
        if master is None or not master.job_id or master.id in self.hang_cancelled:
            return
        self.store.event(
            "hang",
            f"no heartbeat progress for {limit}s: restarting the generation by replacing the master",
            stage=STAGE,
            job=master.id,
            node_rank=master.node_rank,
            job_id=master.job_id,
            timeout=limit,
        )
        self.say(f"no training progress for {limit}s: replacing the master to start a new generation")
        self.hang_cancelled.add(master.id)
        # Straight to the executor, not tracker.cancel: the row must stay live so the next
        # poll sees the end and on_end repairs it like any lost master.  In an allocation
        # only the master's step goes (its end is then on record like any node's).
        step = read_json(self.run.step_record(master.job_id, 0)) or {} if self.in_allocation(master) else {}
        if step.get("step") is not None:
            self.executor.cancel_node(master.job_id, str(step["step"]))
        else:
            self.executor.cancel([master.job_id])

    def waiting(self) -> float:
        """Node-seconds the stage's nodes held allocations waiting for the rest (waiting.py);
        against cluster.nodes, not the slots: with that many nodes held the stage trains."""
        return stage_waiting(self.store, STAGE, self.config.cluster.nodes, self.clock())

    def summary_line(self) -> str:
        """The finished run's summary for the stage row's detail."""
        summary = read_json(self.run.summary) or {}
        if not summary:
            return "done"
        return f"step {summary.get('final_step')}, loss {summary.get('first_loss')} -> {summary.get('last_loss')}"
