"""`JobTracker`: the one path from a JobSpec to a job, and from a poll to the state DB.

Every stage (index shards and merges, the tokenizer, the training nodes, convert,
infer, serve) submits and follows its jobs through here:

    submit:  render -> atomic write -> intent row -> executor.submit -> mark submitted -> event
    poll:    ONE executor.poll over every live job of every stage -> rows updated -> transitions

A failed poll is recorded as a `poll_error` event and changes nothing: UNKNOWN is never
acted on.  A job Slurm requeued by itself (same id, a higher restart count) is reported
as such, never as an end, so nobody resubmits it a second time.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fm9g.orchestrator.executors.base import Executor, JobStatus, PollError
from fm9g.orchestrator.render import JobSpec, ScriptRenderer, config_hash
from fm9g.orchestrator.slurm.states import JobState
from fm9g.orchestrator.state import JobRow, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.atomic import write_text
from fm9g.rundir.config import ClusterConfig

Clock = Callable[[], float]
Stages = str | tuple[str, ...] | None  # one stage, several, or every stage


def log_tail(path: str | Path, size: int = 8192) -> str:
    """The last `size` bytes of a job's log (decoded leniently), or "" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def log_excerpt(path: str | Path, lines: int = 15) -> str:
    """The last lines of a job's log, indented, for an error message (read from the end)."""
    if not Path(path).exists():
        return "  (no log yet)"
    return "\n".join("  " + line for line in log_tail(path).splitlines()[-lines:])


def cancel_jobs(
    store: StateStore,
    executor: Executor,
    rows: Sequence[JobRow],
    reason: str,
    *,
    record: bool = True,
    clock: Clock = time.time,
) -> list[str]:
    """Adopt and cancel the live jobs of `rows`; with `record`, mark their rows CANCELLED
    (left unmarked when a supervisor will see them end and decide).  Returns the job ids."""
    live = [row for row in rows if row.job_id and not row.state.is_terminal]
    for row in live:
        executor.adopt(str(row.job_id), Path(row.log))
    ids = [str(row.job_id) for row in live]
    if ids:
        executor.cancel(ids)
    if record:
        for row in live:
            store.update_job(row.id, state=JobState.CANCELLED, reason=reason, ended_at=clock())
    return ids


class UnknownTooLong(RuntimeError):
    """A job stayed invisible to the executor past the bound; it may still exist."""


class UnseenClock:
    """How long jobs have stayed invisible (UNKNOWN, failed polls) in a row; past `bound`
    seconds a wait stops trusting that they still exist and says so."""

    def __init__(self, bound: float, executor: str) -> None:
        self.bound, self.executor = bound, executor
        self.since: float | None = None

    def check(self, unseen_job_ids: Sequence[str]) -> None:
        """Note one poll's invisible jobs; raises UnknownTooLong once they stayed so too long."""
        if not unseen_job_ids:
            self.since = None
            return
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since > self.bound:
            raise UnknownTooLong(
                f"job(s) {', '.join(unseen_job_ids)} not visible to the {self.executor} executor for "
                f"{self.bound:g}s; they may still exist: look for them (squeue, or the process table), "
                f"then run the command again"
            )


@dataclass(frozen=True)
class Transition:
    """One job row before and after a poll changed it."""

    before: JobRow
    after: JobRow

    @property
    def ended(self) -> bool:
        return self.after.state.is_terminal and not self.before.state.is_terminal

    @property
    def requeued(self) -> bool:
        return self.after.restarts > self.before.restarts


class JobTracker:
    """Submits JobSpecs and keeps their rows in state.db in step with the executor."""

    def __init__(
        self,
        run: RunDir,
        store: StateStore,
        executor: Executor,
        renderer: ScriptRenderer,
        *,
        requeue: bool = False,
        clock: Clock = time.time,
    ) -> None:
        self.run = run
        self.store = store
        self.executor = executor
        self.renderer = renderer
        self.requeue = requeue  # cluster.requeue: Slurm, not us, brings NODE_FAIL'd jobs back
        self.clock = clock
        self.unseen: set[int] = set()  # row ids the last poll could not see (UNKNOWN)
        self.last_statuses: dict[str, JobStatus] = {}  # the last successful poll, by job id

    # ------------------------------------------------------------------ submission
    def write_script(self, spec: JobSpec, attempt: int, cluster: ClusterConfig | None = None) -> tuple[Path, str]:
        """Render `spec`'s attempt into scripts/ (atomically); returns the path and the text."""
        text = self.renderer.render(spec, attempt, cluster)
        path = self.run.scripts / spec.script_name(attempt)
        write_text(path, text, mode=0o755)
        return path, text

    def submit(
        self,
        spec: JobSpec,
        *,
        attempt: int,
        why: str,
        after: Sequence[str] = (),
        cluster: ClusterConfig | None = None,
        jobs_at_once: int = 1,
    ) -> JobRow:
        """Submit one attempt of `spec`, recorded before it is made (a crash in between
        leaves a SUBMITTING row that `resume` resolves by the job's tag)."""
        env = self.executor.job_env(jobs_at_once)
        return self._submit(spec, [spec], attempt=attempt, why=why, after=after, cluster=cluster, env=env)[0]

    def submit_together(
        self, allocation: JobSpec, nodes: Sequence[JobSpec], *, attempt: int, why: str, cluster: ClusterConfig | None
    ) -> list[JobRow]:
        """Submit `allocation`, one job holding every node of `nodes`, and record one row per
        node (its own role, rank and log) sharing the job id: the policy follows and
        replaces nodes one by one, whatever job started them."""
        env = self.executor.job_env(1)
        return self._submit(allocation, nodes, attempt=attempt, why=why, after=(), cluster=cluster, env=env)

    def _submit(
        self,
        job: JobSpec,
        nodes: Sequence[JobSpec],
        *,
        attempt: int,
        why: str,
        after: Sequence[str],
        cluster: ClusterConfig | None,
        env: dict[str, str],
    ) -> list[JobRow]:
        """Submit `job` as one executor job and record a row for each of `nodes` (`job`
        itself, or the nodes of an allocation), every row written before sbatch runs."""
        script, text = self.write_script(job, attempt, cluster)
        tag = job.tag(self.run.name, attempt)
        row_ids = [
            self.store.record_intent(
                stage=node.stage,
                role=node.role,
                node_rank=node.node_rank,
                attempt=attempt,
                generation=node.generation,
                tag=tag,
                script=str(script),
                script_hash=config_hash(text),
                log=str(self.run.stage_logs(node.stage) / node.log_name(attempt)),
            )
            for node in nodes
        ]
        together = len(nodes) > 1
        try:
            job_id = self.executor.submit(
                script,
                log=self.run.stage_logs(job.stage) / job.log_name(attempt),
                tag=tag,
                env=env,
                after=after,
                array=job.array,
            )
        except Exception as exc:
            for row_id in row_ids:
                self.store.update_job(
                    row_id, state=JobState.FAILED, reason=f"not submitted: {exc}", ended_at=self.clock()
                )
            self.store.event(
                "submit_failed",
                f"{job.stage} {job.role}{job.node_rank} attempt {attempt}: {exc}",
                stage=job.stage,
                job=None if together else row_ids[0],
                node_rank=job.node_rank,
                why=why,
            )
            raise
        rows = []
        for row_id, node in zip(row_ids, nodes, strict=True):
            self.store.mark_submitted(row_id, job_id)
            where = f"in allocation {job_id}" if together else f"as job {job_id}"
            self.store.event(
                "submitted",
                f"{node.stage} {node.role}{node.node_rank} attempt {attempt} submitted {where} ({why})",
                stage=node.stage,
                job=row_id,
                node_rank=node.node_rank,
                role=node.role,
                job_id=job_id,
                generation=node.generation,
                attempt=attempt,
                why=why,
                after=list(after),
                together=together,
            )
            row = self.store.job(row_id)
            assert row is not None
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ following
    def next_attempt(self, stage: str) -> int:
        """The attempt number a new submission of `stage` gets."""
        return max((row.attempt for row in self.store.jobs(stage)), default=0) + 1

    def rows(self, stage: Stages = None, live_only: bool = False) -> list[JobRow]:
        """The job rows of `stage`: one stage, several (the training stage and its store
        job, polled together), or every stage (None)."""
        if stage is None or isinstance(stage, str):
            return self.store.jobs(stage, live_only=live_only)
        return [row for name in stage for row in self.store.jobs(name, live_only=live_only)]

    def live_rows(self, stage: Stages = None) -> list[JobRow]:
        return [row for row in self.rows(stage, live_only=True) if row.job_id]

    def adopt(self, rows: Sequence[JobRow] | None = None) -> None:
        """Let this process's executor poll and cancel jobs another process submitted."""
        for row in self.live_rows() if rows is None else rows:
            if row.job_id:
                self.executor.adopt(row.job_id, Path(row.log))

    def poll(self, stage: Stages = None) -> list[Transition] | None:
        """One executor poll over every live job (of `stage`, of several stages, or of every
        stage); None when the poll failed (recorded as a poll_error event; nothing else
        changes)."""
        live = self.live_rows(stage)
        self.unseen = set()
        if not live:
            return []
        try:
            # dict.fromkeys: the nodes of one allocation (cluster.start: together) share a job id.
            statuses = self.executor.poll(list(dict.fromkeys(row.job_id for row in live if row.job_id)))
        except PollError as exc:
            self.unseen = {row.id for row in live}
            named = stage if stage is None or isinstance(stage, str) else stage[0]
            self.store.event("poll_error", f"poll failed, state unknown this tick: {exc}", stage=named or "")
            return None
        self.last_statuses = statuses
        counts = Counter(row.job_id for row in self.rows(stage) if row.job_id)
        transitions = []
        for row in live:
            status = statuses.get(row.job_id or "")
            if status is None or status.state is JobState.UNKNOWN:
                self.unseen.add(row.id)
                continue  # cannot tell: never acted on
            after = self.apply(row, status, own_node=counts[row.job_id] == 1)
            if after is not None:
                transitions.append(Transition(row, after))
        return transitions

    def apply(self, row: JobRow, status: JobStatus, own_node: bool = True) -> JobRow | None:
        """Write what a poll saw into `row`; the updated row, or None when nothing changed.
        `own_node` False: the row is one node of a job of several, whose host is the batch
        host's or a node list; the row learns its own host elsewhere (its step record)."""
        fields: dict[str, object] = {}
        if self.requeue and status.state in (JobState.NODE_FAIL, JobState.PREEMPTED):
            # Slurm owns requeue for this run (--requeue): the same job id comes back by
            # itself, so this end is not final and must not be repaired a second time.
            status = replace(status, state=JobState.REQUEUED, reason=f"{status.state.value}, Slurm requeues it")
        if (
            row.state is JobState.RUNNING
            and status.state in (JobState.PENDING, JobState.REQUEUED)
            and status.restarts <= row.restarts
        ):
            status = replace(status, restarts=row.restarts + 1)  # squeue shows no restart count
        if status.restarts > row.restarts:
            fields["restarts"] = status.restarts
            self.store.event(
                "requeued_by_slurm",
                f"job {row.job_id} was requeued by Slurm (restart {status.restarts}); not resubmitting",
                stage=row.stage,
                job=row.id,
                node_rank=row.node_rank,
            )
        if status.state is not row.state:
            fields["state"] = status.state
        if own_node and status.node and status.node != row.node:
            fields["node"] = status.node
        if status.reason != row.reason:
            fields["reason"] = status.reason
        if status.state is JobState.RUNNING and row.started_at is None:
            fields["started_at"] = status.started_at or self.clock()
        if status.state.is_terminal:
            if status.exit_code is not None or row.exit_code is None:
                fields["exit_code"] = status.exit_code
            if row.ended_at is None or not row.state.is_terminal:
                fields["ended_at"] = status.ended_at or self.clock()
            if status.started_at is not None and row.started_at is None:
                fields["started_at"] = status.started_at
        if not fields:
            return None
        self.store.update_job(row.id, **fields)
        return self.store.job(row.id)

    def cancel(self, rows: Sequence[JobRow], reason: str) -> list[str]:
        """Cancel live jobs and mark their rows ended; returns the job ids."""
        return cancel_jobs(self.store, self.executor, rows, reason, clock=self.clock)

    def wait(
        self,
        rows: Sequence[JobRow],
        *,
        interval: float,
        unknown_bound: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        on_tick: Callable[[], None] | None = None,
    ) -> list[JobRow]:
        """Poll until every one of `rows` has ended; their final rows.  A job invisible
        (UNKNOWN, failed polls) for longer than `unknown_bound` seconds raises UnknownTooLong."""
        ids = [row.id for row in rows]
        stage = rows[0].stage if rows and all(row.stage == rows[0].stage for row in rows) else None
        clock = UnseenClock(unknown_bound, self.executor.name)
        while True:
            current = [self.store.job(row_id) for row_id in ids]
            if all(row is not None and row.state.is_terminal for row in current):
                return [row for row in current if row is not None]
            self.poll(stage)
            if on_tick is not None:
                on_tick()
            clock.check([str(row.job_id) for row in current if row and row.id in self.unseen])
            sleep(interval)
