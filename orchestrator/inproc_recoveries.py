"""The in-process recoveries of a run (supervise.on_node_loss wait/shrink), from its
membership events (rundir/inproc_events.py, imported into state.db as `inproc` events).

Pure: the event records in, a list of `InprocRecovery` out, each with its phases
(detected -> re-formed -> state synced -> first step), the generations and world sizes
around it, the steps it discarded, and whether the fast path held or fell back to a
restart from the last checkpoint.  `status --failures`, `status --json` and the TUI's
failure timeline show them.

A recovery opens at the first loss after the last committed progress: a `detected`
(a rank discarded its step in flight), a `gone` (a former member missing at a
formation), or an agent's `rank_exit` with a nonzero code, whichever comes first.  It
closes at the first `first_step` of a generation newer than the one that was running
when it opened.  Losses while it is open (a second fault before the survivors stepped
again) belong to it: one recovery, not two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fm9g.rundir.inproc_events import trainer_uid

# The state.db event kind of an imported record (orchestrator/inproc_import.py).
INPROC_KIND = "inproc"
# Events that open a recovery (rank_exit only with a nonzero code).
LOSS_EVENTS = frozenset({"detected", "gone", "rank_exit"})
# Events that mean the fast path gave up: ranks restart from the disk checkpoint.
FALLBACK_EVENTS = frozenset({"recovery_failed", "fallback"})
PHASES = ("detected", "re_formed", "state_synced", "first_step")


@dataclass
class InprocRecovery:
    """One in-process recovery; times are Unix seconds, None while not reached."""

    policy: str
    detected: float
    generation_before: int | None
    world_before: int | None
    generation_after: int | None = None
    world_after: int | None = None
    re_formed: float | None = None
    state_synced: float | None = None
    first_step: float | None = None
    path: str = "fast"  # or "fallback"
    lost_steps: set[tuple[int, int]] = field(default_factory=set)  # (gen, seq) of each discarded step
    lost: list[str] = field(default_factory=list)  # uids seen gone or exited, in order
    rolled_back: int = 0  # committed steps trained again: sharded state restored from an older copy

    @property
    def finished(self) -> bool:
        return self.first_step is not None

    @property
    def steps_lost(self) -> int:
        return len(self.lost_steps) + self.rolled_back

    @property
    def total_s(self) -> float | None:
        return None if self.first_step is None else self.first_step - self.detected

    def offsets(self) -> dict[str, float | None]:
        """Each phase as seconds after `detected` (None while not reached, or for
        state_synced when nobody needed state)."""
        return {
            phase: None if (value := getattr(self, phase)) is None else round(value - self.detected, 3)
            for phase in PHASES
        }

    def to_json(self) -> dict[str, Any]:
        """The `inproc_recovery` object of `status --json` (docs/status-schema.md)."""
        return {
            "detected_at": self.detected,
            "policy": self.policy,
            "path": self.path,
            "finished": self.finished,
            "phases": self.offsets(),
            "total_s": None if self.total_s is None else round(self.total_s, 3),
            "steps_lost": self.steps_lost,
            "generation_before": self.generation_before,
            "generation_after": self.generation_after,
            "world_before": self.world_before,
            "world_after": self.world_after,
            "lost": list(self.lost),
        }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _time(record: Mapping[str, Any]) -> float:
    value = record.get("t")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass
class _Generation:
    """What the events say about one generation across its members."""

    formed: float | None = None  # the latest member's `formed`
    synced: float | None = None  # the latest member's `synced` that received state
    first_step: float | None = None  # the earliest member's `first_step`
    world_size: int | None = None
    rolled_back: int = 0  # the most steps a member's `resharded` rolled back


def _generations(records: list[Mapping[str, Any]]) -> dict[int, _Generation]:
    gens: dict[int, _Generation] = {}
    for record in records:
        gen = _int(record.get("gen"))
        if gen is None:
            continue
        info = gens.setdefault(gen, _Generation())
        t = _time(record)
        event = record["event"]
        if event == "formed":
            info.formed = t if info.formed is None else max(info.formed, t)
            info.world_size = _int(record.get("world_size")) or info.world_size
        elif event == "synced" and record.get("received", True):
            info.synced = t if info.synced is None else max(info.synced, t)
        elif event == "first_step":
            info.first_step = t if info.first_step is None else min(info.first_step, t)
        elif event == "resharded":
            info.rolled_back = max(info.rolled_back, _int(record.get("rolled_back")) or 0)
    return gens


def _is_loss(record: Mapping[str, Any]) -> bool:
    event = record["event"]
    if event == "rank_exit":
        return record.get("code") not in (0, None)
    return event in LOSS_EVENTS


def _lost_uids(record: Mapping[str, Any]) -> list[str]:
    event = record["event"]
    if event == "gone":
        return [str(uid) for uid in record.get("uids") or []]
    if event == "rank_exit":
        return [trainer_uid(record.get("node_rank"), record.get("local_rank"), record.get("pid"))]
    return []


def _belongs_to(recovery: InprocRecovery, record: Mapping[str, Any]) -> bool:
    """A late report of a loss `recovery` already handled (so it opens no new one): a
    `detected` or `gone` of a generation it already left, or the exit of a process it
    already saw gone."""
    gen = _int(record.get("gen"))
    event = record["event"]
    if event == "detected" and gen is not None and recovery.generation_before is not None:
        return gen <= recovery.generation_before
    if event == "gone" and gen is not None and recovery.generation_after is not None:
        return gen <= recovery.generation_after
    if event == "rank_exit":
        return all(uid in recovery.lost for uid in _lost_uids(record))
    return False


def _add_loss(recovery: InprocRecovery, record: Mapping[str, Any]) -> None:
    if record["event"] == "detected":
        gen, seq = _int(record.get("gen")), _int(record.get("seq"))
        if gen is not None and seq is not None:
            recovery.lost_steps.add((gen, seq))
    for uid in _lost_uids(record):
        if uid not in recovery.lost:
            recovery.lost.append(uid)


def _settle(recovery: InprocRecovery, gens: Mapping[int, _Generation], newest: int | None) -> None:
    """Fill in the phases from the generation the recovery moved to (while still open: the
    newest one formed since it opened)."""
    target = recovery.generation_after if recovery.generation_after is not None else newest
    before = recovery.generation_before
    if target is None or (before is not None and target <= before):
        return
    info = gens.get(target)
    if info is None:
        return
    recovery.generation_after = target
    recovery.world_after = info.world_size
    recovery.re_formed = info.formed
    recovery.state_synced = info.synced
    recovery.rolled_back = info.rolled_back


def inproc_recoveries(records: Iterable[Mapping[str, Any]], policy: str) -> list[InprocRecovery]:
    """The recoveries the inproc event `records` show, oldest first; `policy` is the
    run's supervise.on_node_loss.  Records are ordered here by their time `t` (each
    writer's file is imported on its own, so state.db's order interleaves them by file)."""
    ordered = sorted((r for r in records if isinstance(r.get("event"), str)), key=_time)
    gens = _generations(ordered)
    recoveries: list[InprocRecovery] = []
    current: int | None = None  # the newest generation formed so far
    open_: InprocRecovery | None = None
    newest_since_open: int | None = None
    for record in ordered:
        event, t, gen = record["event"], _time(record), _int(record.get("gen"))
        if event == "formed" and gen is not None:
            current = gen if current is None else max(current, gen)
            if open_ is not None and (open_.generation_before is None or gen > open_.generation_before):
                newest_since_open = gen if newest_since_open is None else max(newest_since_open, gen)
        if _is_loss(record):
            if open_ is None and recoveries and _belongs_to(recoveries[-1], record):
                _add_loss(recoveries[-1], record)
                continue
            if open_ is None:
                open_ = InprocRecovery(
                    policy=policy,
                    detected=t,
                    generation_before=current,
                    world_before=gens[current].world_size if current is not None and current in gens else None,
                )
                newest_since_open = None
                recoveries.append(open_)
            _add_loss(open_, record)
        elif event in FALLBACK_EVENTS and open_ is not None:
            open_.path = "fallback"
        elif event == "first_step" and open_ is not None and gen is not None:
            if open_.generation_before is None or gen > open_.generation_before:
                open_.generation_after = gen
                open_.first_step = t  # records are in time order: the earliest of this generation
                _settle(open_, gens, gen)
                open_ = None
    if open_ is not None:
        _settle(open_, gens, newest_since_open)
    return recoveries
