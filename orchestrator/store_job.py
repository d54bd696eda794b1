"""`StoreKeeper`: keeps the run's store job alive while the training stage runs
(supervise.on_node_loss wait/shrink).

The store job hosts the one TCPStore through which every trainer rank forms its process
groups (launchers/store_host.py), in a 1-CPU job of its own.  Its job rows are rows of
stage `plan.STORE` ("store"), submitted and polled through the same JobTracker as the
node jobs, but never rows of the training stage: `TrainPolicy.latest_rows` (keyed by
node rank), the end, hang and replacement logic, heartbeats and waiting node-seconds all
read stage "train" only, so the store is never counted as a training node.  The stages
table has no "store" row: the run's status is its stages', and the store's job ends
with the training stage it serves.

Events (stage "store", besides the tracker's own `submitted`):
  store_submitted {job_id, attempt, why}: each submission;
  store_lost {job_id, state, exit_code, serial}: the store job ended while the stage
    still runs (serial: the one it published, None when it never did); a new one is
    submitted at once.  After STORE_START_FAILURES losses in a row of stores that never
    published, the stage stops instead (follow returns the reason).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fm9g.orchestrator.jobs import JobTracker
from fm9g.orchestrator.plan import STORE, inproc_recovery, store_spec
from fm9g.orchestrator.state import JobRow, StateStore
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.config import ClusterConfig, RunConfig
from fm9g.rundir.store_endpoint import read_store_endpoint

Say = Callable[[str], None]
Clock = Callable[[], float]

# Stores lost in a row without ever publishing their endpoint before the stage stops
# (a broken environment would otherwise be resubmitted forever).
STORE_START_FAILURES = 3
UNSTARTED = "store_unstarted"  # state.db meta: such losses in a row


def _quiet(_: str) -> None:
    pass


class StoreKeeper:
    """Submits, follows and cancels the store job of one training stage."""

    def __init__(
        self,
        run: RunDir,
        config: RunConfig,
        store: StateStore,
        tracker: JobTracker,
        cluster: Callable[[], ClusterConfig],
        *,
        say: Say = _quiet,
        clock: Clock = time.time,
    ) -> None:
        self.run = run
        self.config = config
        self.store = store
        self.tracker = tracker
        self.cluster = cluster  # the run's cluster section with the live node exclusions
        self.say = say
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return inproc_recovery(self.config)

    def latest(self) -> JobRow | None:
        """The newest store job row, or None."""
        rows = self.store.jobs(STORE)
        return rows[-1] if rows else None

    def live(self) -> JobRow | None:
        """The newest store job row while its job is submitted and has not ended."""
        row = self.latest()
        return row if row is not None and row.live and row.job_id else None

    def ensure(self, why: str) -> None:
        """Submit a store job unless one is live (called before any node is submitted)."""
        if self.enabled and self.live() is None:
            self.submit(why)

    def submit(self, why: str) -> JobRow:
        attempt = self.tracker.next_attempt(STORE)
        row = self.tracker.submit(store_spec(), attempt=attempt, why=why, cluster=self.cluster())
        self.store.event(
            "store_submitted",
            f"store job {row.job_id} submitted (attempt {attempt}, {why})",
            stage=STORE,
            job=row.id,
            job_id=row.job_id,
            attempt=attempt,
            why=why,
        )
        self.say(f"submitted the store job as job {row.job_id} ({why})")
        return row

    def follow(self) -> str | None:
        """Once per tick while the stage runs: a store job that ended is written as a
        `store_lost` event and submitted again at once.  Returns why the stage must stop
        when stores keep ending before they ever published, else None."""
        row = self.latest()
        if not self.enabled or row is None or row.live:
            return None
        if self.run.done_flag.exists() or self.run.cancel_flag.exists():
            return None  # the store exits by itself on these; the stage is ending
        exit_code = row.exit_code
        if exit_code is None and row.job_id:
            # squeue shows an end before sacct knows its exit code; the store wrote it down.
            recorded = protocol.read_exit_code(self.run.exit_record(row.job_id))
            if recorded is not None:
                exit_code = recorded[0]
                self.store.update_job(row.id, exit_code=exit_code)
        published = read_store_endpoint(self.run.store_endpoint)
        serial = published.serial if published is not None and published.job_id == row.job_id else None
        self.store.event(
            "store_lost",
            f"store job {row.job_id} ended {row.state.value} (exit code {exit_code}) while the stage runs; "
            "submitting a new one",
            stage=STORE,
            job=row.id,
            job_id=row.job_id,
            state=row.state.value,
            exit_code=exit_code,
            serial=serial,
        )
        self.say(f"the store job {row.job_id} ended {row.state.value}; submitting a new one")
        unstarted = 0 if serial is not None else int(self.store.meta(UNSTARTED, 0)) + 1
        self.store.set_meta(UNSTARTED, unstarted)
        if unstarted >= STORE_START_FAILURES:
            return (
                f"{unstarted} store jobs in a row ended before they published rendezvous/store.json "
                f"(last: job {row.job_id}, {row.state.value}); see {row.log}"
            )
        self.submit("store lost")
        return None

    def cancel(self, reason: str) -> list[str]:
        """Cancel the live store job (the stage ended); its job ids."""
        row = self.live()
        return self.tracker.cancel([row], reason=reason) if row is not None else []
