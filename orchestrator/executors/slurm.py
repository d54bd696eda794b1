"""`SlurmExecutor`: submits rendered scripts with sbatch and polls every live job with one
squeue call per tick; sacct, bounded by a start time, only for jobs that left the queue.

A failed squeue raises PollError (the tick is skipped); a job missing from both squeue
and sacct (accounting lags slurmctld by seconds) is UNKNOWN, never FAILED.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from fm9g.orchestrator.executors.base import JobStatus, PollError
from fm9g.orchestrator.slurm import commands
from fm9g.orchestrator.slurm.parse import SacctRow, SqueueRow
from fm9g.orchestrator.slurm.states import JobState


def _from_squeue(row: SqueueRow, now: float) -> JobStatus:
    running = row.state in (JobState.RUNNING, JobState.COMPLETING)
    started = now - row.elapsed.total_seconds() if row.elapsed and running else None
    reason = "" if row.reason == "None" else row.reason  # squeue prints "None" for no reason
    return JobStatus(row.state, node=row.batch_host or row.nodes, reason=reason, started_at=started, held=row.nodes)


def _from_sacct(row: SacctRow) -> JobStatus:
    # A job killed by a signal reports 0:<signal>; a shell would call that 128+signal.
    code = row.exit_code if not row.signal else 128 + row.signal
    return JobStatus(
        row.state,
        exit_code=code,
        node=row.node_list,
        restarts=row.restarts,
        started_at=row.start.timestamp() if row.start else None,
        ended_at=row.end.timestamp() if row.end else None,
    )


class SlurmExecutor:
    """Submits with sbatch; one squeue per poll, sacct only for jobs that left the queue."""

    name = "slurm"

    def __init__(self, client: commands.SlurmClient | None = None, since: datetime | None = None) -> None:
        self.client = client or commands.SlurmClient()
        # sacct only searches from here on: a bounded query stays cheap for slurmdbd.
        self.since = since or datetime.now() - timedelta(days=2)

    def submit(
        self,
        script: Path,
        *,
        log: Path,
        tag: str,
        env: dict[str, str] | None = None,
        after: Sequence[str] = (),
        array: int | None = None,
    ) -> str:
        log.parent.mkdir(parents=True, exist_ok=True)
        # '%' starts a filename pattern for sbatch (%j, %N); a literal one is '%%'.
        output = str(log).replace("%", "%%")
        args = []
        if array is not None:
            args.append(f"--array=0-{array - 1}")
            # One log per task: <stem>-<task>.out (%a is sbatch's task-index pattern).
            output = str(log.parent / log.stem).replace("%", "%%") + "-%a" + log.suffix.replace("%", "%%")
        args += [f"--output={output}", f"--error={output}"]
        if after:
            args += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
        job_id = self.client.submit(script, extra_args=args, env=env)
        return str(job_id)

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = [int(job_id) for job_id in job_ids]
        try:
            queued = self.client.squeue(ids)
        except commands.PollError as exc:
            raise PollError(str(exc)) from None
        now = time.time()
        result = {str(job_id): _from_squeue(row, now) for job_id, row in queued.items()}
        # An array job is polled by its array id: while any of its tasks is queued or
        # running, that is the array's state (the task whose own id is the array id may
        # have finished first).
        for row in queued.values():
            if row.array_job_id in ids and row.array_job_id != row.job_id and row.state.is_active:
                current = result.get(str(row.array_job_id))
                if current is None or not current.state.is_active or row.state is JobState.RUNNING:
                    result[str(row.array_job_id)] = _from_squeue(row, now)
        # Jobs that left the queue, and ended jobs squeue still shows (it has no exit
        # code): one bounded sacct call for all of them.
        gone = [job_id for job_id in ids if not result.get(str(job_id)) or result[str(job_id)].state.is_terminal]
        if gone:
            try:
                accounted = self.client.sacct(gone, self.since)
            except commands.PollError:
                accounted = {}
            for job_id in gone:
                row = accounted.get(job_id)
                if row is None or (str(job_id) in result and not row.state.is_terminal):
                    if str(job_id) not in result:
                        result[str(job_id)] = JobStatus(JobState.UNKNOWN)  # accounting lags: ask again next tick
                    continue  # squeue's view stands; the exit code comes from the agent's record
                elif row.state is JobState.REQUEUED:
                    # Cancelled while waiting to restart: sacct keeps REQUEUED as its last
                    # state for good, but the job is gone from the queue, so it has ended.
                    result[str(job_id)] = JobStatus(
                        JobState.CANCELLED, node=row.node_list, restarts=row.restarts, reason="cancelled while requeued"
                    )
                else:
                    result[str(job_id)] = _from_sacct(row)
        return result

    def cancel(self, job_ids: Sequence[str]) -> None:
        self.client.cancel(int(job_id) for job_id in job_ids)

    def cancel_node(self, job_id: str, step: str) -> None:
        self.client.cancel_step(int(job_id), int(step))

    def release_node(self, job_id: str, node: str) -> bool:
        return self.client.release_node(int(job_id), node)

    def adopt(self, job_id: str, log: Path) -> None:
        """Nothing to do: squeue and sacct see every job by its id."""

    def usable_nodes(self) -> set[str] | None:
        """Every node name of every partition, as sinfo lists them now."""
        return set().union(*(partition.node_names for partition in self.client.partitions().values()))

    def job_env(self, jobs_at_once: int) -> dict[str, str]:
        return {}  # Slurm gives each job its own allocation and SLURM_* variables

    def tick_interval(self, configured: float) -> float:
        return configured
