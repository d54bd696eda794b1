"""Waiting node-seconds: how long a training stage's nodes held an allocation while the
rest of its nodes were not there.

Each node of a training stage is its own job (cluster.start: separate), so on a busy
cluster the master may hold its GPUs for hours until the last worker starts, and the
survivors of a lost node hold theirs while its replacement queues.  Nothing trains
then.  The figure integrates over time the number of the stage's node jobs that are
running (started, not ended) while fewer than `cluster.nodes` distinct node ranks are
running.  Jobs that start together (cluster.start: together) add nothing at start.

Once a node job ends by itself cleanly (training done, or checkpointed for a continue)
the others are finishing, not waiting: nothing counts from that end until a node job
starts again (the continue's fresh start, whose own stagger counts).

Pure: it works on job rows (one per node rank per attempt) and a clock value, so
`status`, the TUI, the end-of-run summary and the supervisor's `stage_end` event all
show the same number.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fm9g.orchestrator.state import JobState, StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.protocol import EXIT_CONTINUE, EXIT_OK

# The stages table's `kind` of a training stage (plan.StageKind.TRAIN; plan itself is not
# imported: it loads the config models, too slow for `status`).
TRAIN_KIND = "train"

__all__ = ["NodeSpan", "run_waiting", "spans", "stage_waiting", "waiting_node_seconds"]


class JobTimes(Protocol):
    """What this module reads of a job row (`state.JobRow` has it)."""

    node_rank: int
    started_at: float | None
    ended_at: float | None
    updated_at: float | None
    state: JobState
    exit_code: int | None

    @property
    def live(self) -> bool: ...


@dataclass(frozen=True)
class NodeSpan:
    """One node job's time holding its allocation: [start, end), end None while it runs;
    `clean` when it ended by itself with nothing left to do (exit 0, or 75 = continue)."""

    node_rank: int
    start: float
    end: float | None
    clean: bool = False


def spans(rows: Iterable[JobTimes]) -> list[NodeSpan]:
    """The allocation spans of job rows; a row that never started holds nothing.  A row
    written as ended without an end time ended when it was last written."""
    found = []
    for row in rows:
        if row.started_at is None:
            continue
        end = row.ended_at
        if end is None and not row.live:
            end = row.updated_at if row.updated_at is not None else row.started_at
        clean = row.exit_code in (EXIT_OK, EXIT_CONTINUE) or (row.exit_code is None and row.state is JobState.COMPLETED)
        found.append(NodeSpan(row.node_rank, row.started_at, end, clean=end is not None and clean))
    return found


def waiting_node_seconds(node_spans: Iterable[NodeSpan], nodes: int, now: float) -> float:
    """Node-seconds up to `now` during which fewer than `nodes` distinct node ranks held an
    allocation, counting every span that held one then (a sweep over start and end times),
    except from a clean end to the next start."""
    changes: list[tuple[float, int, int, bool]] = []  # (time, +1 start / -1 end, node rank, clean end)
    for span in node_spans:
        end = now if span.end is None else min(span.end, now)
        if end <= span.start:
            continue
        changes.append((span.start, 1, span.node_rank, False))
        changes.append((end, -1, span.node_rank, span.clean and span.end is not None and span.end <= now))
    changes.sort()
    total = 0.0
    holding: dict[int, int] = {}  # node rank -> spans of that rank running now
    finishing = False  # since a clean end: the rest are finishing, not waiting
    previous: float | None = None
    for when, delta, rank, clean in changes:
        running = sum(holding.values())
        if previous is not None and running and len(holding) < nodes and not finishing:
            total += running * (when - previous)
        holding[rank] = holding.get(rank, 0) + delta
        if holding[rank] == 0:
            del holding[rank]
        finishing = (finishing or clean) and delta < 0
        previous = when
    return total


def stage_waiting(store: StateStore, stage: str, nodes: int, now: float) -> float:
    """The waiting node-seconds of training stage `stage` in `store`, over all its attempts."""
    return waiting_node_seconds(spans(store.jobs(stage)), nodes, now)


def run_waiting(run: RunDir, now: float) -> float | None:
    """The training stage's waiting node-seconds from the run's state.db (the stage of
    kind `train`; meta `nodes` is its node count, written by every supervisor start);
    None when the run has no training jobs or no count."""
    if not run.state_db.exists():
        return None
    store = StateStore(run.state_db, readonly=True)
    try:
        nodes = store.meta("nodes")
        rows = [row for stage in store.stages() if stage.kind == TRAIN_KIND for row in store.jobs(stage.name)]
    finally:
        store.close()
    if not isinstance(nodes, int) or not rows:
        return None
    return waiting_node_seconds(spans(rows), nodes, now)
