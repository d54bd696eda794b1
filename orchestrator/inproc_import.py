"""Copies the membership events of in-process recovery (events/inproc/<uid>.jsonl, written
by trainer processes and node agents; rundir/inproc_events.py) into state.db as events of
kind `inproc`, so `status`, the TUI and the supervisor read them like any other event.

The supervisor calls `import_inproc_events` once a tick.  How far each file was read is
kept in state.db's meta (INPROC_OFFSETS: {file name: byte offset}) and written in the
same transaction as the events, so a supervisor killed mid-import and started again
imports every line exactly once.  A torn last line (a writer killed mid-write, or one
still writing) stays for the next tick.

The supervisor counts the LOSS_EVENTS among them: a peer lost, told in-band before Slurm
says its job ended.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from fm9g.orchestrator.inproc_recoveries import INPROC_KIND, LOSS_EVENTS
from fm9g.orchestrator.plan import TRAIN
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.inproc_events import read_events

__all__ = ["INPROC_KIND", "INPROC_OFFSETS", "LOSS_EVENTS", "describe", "import_inproc_events"]

INPROC_OFFSETS = "inproc_offsets"
# StateStore.event's own parameters: a record field of that name is kept under a prefix.
RESERVED = frozenset({"kind", "message", "stage", "job"})


def describe(record: Mapping[str, Any]) -> str:
    """A short line for one record, e.g. 'n1r0p123: formed gen 3 (world 4)'."""
    uid, event = record.get("uid", "?"), record.get("event", "?")
    gen = f" gen {record['gen']}" if "gen" in record else ""
    if event == "formed":
        return f"{uid}: formed{gen} (world {record.get('world_size', '?')})"
    if event == "synced":
        how = f"from {record.get('source')}" if record.get("received") else "nothing to receive"
        return f"{uid}: synced{gen} ({how})"
    if event == "resharded":
        back = f", rolled back {record['rolled_back']}" if record.get("rolled_back") else ""
        return (
            f"{uid}: re-sharded{gen} at step {record.get('step', '?')} (world {record.get('world_before')} -> "
            f"{record.get('world_after')}; {record.get('from_copies', 0)} shard(s) from peer copies{back})"
        )
    if event == "detected":
        return f"{uid}: detected a loss at{gen} step {record.get('seq', '?')} ({record.get('reason', '')})"
    if event == "gone":
        return f"{uid}: forming{gen}, gone: {', '.join(map(str, record.get('uids') or []))}"
    if event == "rank_exit":
        return f"{uid}: local rank {record.get('local_rank')} (pid {record.get('pid')}) exited {record.get('code')}"
    if event in ("recovery_failed", "fallback", "start_failed", "rank_restart"):
        return f"{uid}: {event}{gen}: {record.get('reason', '')}"
    return f"{uid}: {event}{gen}"


def import_inproc_events(run: RunDir, store: StateStore, *, counting: Collection[str] | None = None) -> int:
    """Write the new complete lines of every events/inproc/*.jsonl into `store` as `inproc`
    events (the record's fields as the event's data), oldest first by the record's time;
    how many were imported, or with `counting`, how many of those were of these event
    names (the supervisor passes LOSS_EVENTS to learn of a loss in-band)."""
    folder = run.inproc_events
    if not folder.is_dir():
        return 0
    offsets: dict[str, int] = dict(store.meta(INPROC_OFFSETS) or {})
    fresh: list[dict[str, Any]] = []
    moved: dict[str, int] = {}
    for path in sorted(folder.glob("*.jsonl")):
        start = int(offsets.get(path.name, 0))
        try:
            if path.stat().st_size <= start:
                continue  # nothing new: no need to open it
        except OSError:
            continue
        records, end = read_events(path, start)
        if end != start:
            moved[path.name] = end
            fresh.extend(records)
    if not moved:
        return 0
    fresh.sort(key=lambda record: record.get("t") if isinstance(record.get("t"), (int, float)) else 0.0)
    with store.transaction():
        for record in fresh:
            data = {(f"record_{key}" if key in RESERVED else key): value for key, value in record.items()}
            store.event(INPROC_KIND, describe(record), stage=TRAIN, **data)
        store.set_meta(INPROC_OFFSETS, {**offsets, **moved})
    if counting is None:
        return len(fresh)
    return sum(1 for record in fresh if record.get("event") in counting)
