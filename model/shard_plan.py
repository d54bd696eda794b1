"""Where a sharded (FSDP2) run's state lives after a loss, and which copy to restore from.

Pure functions over small records, so the choice can be tested without a process group.

FSDP2 shards every parameter, and Adam's two moments with it, along dim 0 the way
`torch.chunk` does: with `world` ranks each holds `ceil(rows / world)` rows, the last
ones fewer or none.  A *layout* is one generation's sharding (its number and world size);
a rank's shard of a layout at a step is held by:

  live      the rank itself, at the step it has applied;
  own       the rank's host-memory snapshot of itself (`supervise.snapshot_every`);
  ward      its buddy's copy of that snapshot, on the next node (`buddy_of`);
  full      a process that holds the whole unsharded state (loaded from disk at start).

After a re-form every member reports what it holds, and `plan_restore` picks the newest
step at which every shard of one layout has a holder among the members.  No such step
means the state is gone with the lost node (a rank and its buddy both lost): the caller
falls back to the disk checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Layout:
    """One generation's sharding: the generation that formed it and its world size."""

    gen: int
    world: int


@dataclass(frozen=True)
class Held:
    """One shard a member can produce: rank `rank` of `layout`, as it was after `step` steps."""

    layout: Layout
    rank: int
    step: int
    kind: str  # live | own | ward

    def to_json(self) -> list[Any]:
        return [self.layout.gen, self.layout.world, self.rank, self.step, self.kind]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Held:
        gen, world, rank, step, kind = raw
        return cls(Layout(int(gen), int(world)), int(rank), int(step), str(kind))


@dataclass(frozen=True)
class Holdings:
    """Everything one member of the new generation can contribute."""

    shards: tuple[Held, ...] = ()
    full_step: int | None = None  # the step of a whole unsharded state this member holds

    def to_json(self) -> dict[str, Any]:
        return {"shards": [h.to_json() for h in self.shards], "full_step": self.full_step}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Holdings:
        return cls(tuple(Held.from_json(h) for h in raw["shards"]), raw["full_step"])


@dataclass(frozen=True)
class RestorePlan:
    """What the new generation restores: `step`, and for each old rank the member (by its
    new rank) that writes that rank's rows; `full_source` instead when a member holds the
    whole state.  `everyone_full`: every member holds it, so nothing travels."""

    step: int
    layout: Layout | None = None
    writers: dict[int, tuple[int, str]] = field(default_factory=dict)  # old rank -> (member, kind)
    full_source: int | None = None
    everyone_full: bool = False
    small_source: int = 0  # the member whose schedule, progress and slot positions are taken


class NoShardCopy(RuntimeError):
    """No step at which every shard has a holder; the message names what is missing."""


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The [start, end) rows of `rank`'s shard of a dim-0 of `rows`, as torch.chunk cuts it."""
    per = -(-rows // world) if rows else 0
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def buddy_of(rank: int, world: int, ranks_per_node: int) -> int | None:
    """The rank that keeps `rank`'s snapshot: `ranks_per_node` ranks on, so on the next node
    when ranks are laid out node by node.  None when there is no other rank."""
    if world < 2:
        return None
    step = ranks_per_node % world or 1
    return (rank + step) % world


def ward_of(rank: int, world: int, ranks_per_node: int) -> int | None:
    """The rank whose snapshot `rank` keeps (the inverse of `buddy_of`)."""
    if world < 2:
        return None
    step = ranks_per_node % world or 1
    return (rank - step) % world


def plan_restore(members: list[Holdings]) -> RestorePlan:
    """The newest fully held step; NoShardCopy when no step is."""
    if not members:
        raise NoShardCopy("no members")
    candidates: list[RestorePlan] = []
    full = [(h.full_step, m) for m, h in enumerate(members) if h.full_step is not None]
    if full:
        step, source = max(full)
        everyone = all(h.full_step == step for h in members)
        candidates.append(RestorePlan(step, full_source=source, everyone_full=everyone, small_source=source))
    # (layout, step) -> old rank -> writer; a member's own rows (live, own) win over a copy.
    found: dict[tuple[Layout, int], dict[int, tuple[int, str]]] = {}
    for member, holdings in enumerate(members):
        for held in holdings.shards:
            writers = found.setdefault((held.layout, held.step), {})
            if held.rank not in writers or (writers[held.rank][1] == "ward" and held.kind != "ward"):
                writers[held.rank] = (member, held.kind)
    for (layout, step), writers in found.items():
        if len(writers) == layout.world:
            source = min(member for member, _ in writers.values())
            candidates.append(RestorePlan(step, layout=layout, writers=dict(writers), small_source=source))
    if not candidates:
        raise NoShardCopy(_missing(found))
    # Newest step first; at a tie a whole copy (no traffic), then the newest layout.
    return max(
        candidates, key=lambda p: (p.step, p.everyone_full, p.full_source is not None, p.layout or Layout(-1, 0))
    )


def _missing(found: dict[tuple[Layout, int], dict[int, tuple[int, str]]]) -> str:
    if not found:
        return "no member holds any shard or a whole state"
    (layout, step), writers = max(found.items(), key=lambda item: (item[0][1], len(item[1])))
    lost = sorted(set(range(layout.world)) - set(writers))
    return (
        f"the shards of rank(s) {lost} of generation {layout.gen} (world {layout.world}) at step {step} "
        "have no live copy (a rank and the peer keeping its snapshot were both lost)"
    )
