"""The pure rules of in-process recovery: store key names, the records ranks exchange,
and the decision that closes a generation (who is in it, at which rank, and who sends
the state).  No I/O here, so every rule is tested without a store or a process.

A *generation* is one process group.  Ranks that want to be in generation N append
their uid to N's roster and publish a `JoinRecord`; any of them may close N once the
policy's condition holds, by writing the `Decision` with a first-writer-wins
compare-and-set, so every rank reads the same one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Policy = Literal["wait", "shrink"]
POLICIES: tuple[Policy, ...] = ("wait", "shrink")

# Commit-vote outcomes written once per step (see generations.StepGuard.commit).
COMMIT = "commit"
COMMIT_THEN_REFORM = "commit+reform"  # applied everywhere, then everyone re-forms (a newer generation is waiting)
ABORT = "abort"


class Keys:
    """Every store key, spelled once.  The store handed to the ranks is already prefixed
    with the run's namespace, so these stay short."""

    GEN = "gen"  # the newest announced generation number
    UIDS = "uids"  # every uid that ever registered, "a,b,c,"
    LOST = "lost"  # every uid declared lost, same form
    CLOSED = "closed"  # the session ended (trained out, or checkpointed to stop): spares and joiners leave

    @staticmethod
    def heartbeat(uid: str) -> str:
        return f"hb/{uid}"

    @staticmethod
    def identity(uid: str) -> str:
        return f"who/{uid}"  # {"pid", "host"}: what an agent needs to kill a lost rank

    @staticmethod
    def lost(uid: str) -> str:
        return f"lost/{uid}"

    @staticmethod
    def roster(gen: int) -> str:
        return f"g/{gen}/roster"

    @staticmethod
    def join(gen: int, uid: str) -> str:
        return f"g/{gen}/join/{uid}"

    @staticmethod
    def decision(gen: int) -> str:
        return f"g/{gen}/members"

    @staticmethod
    def ready(gen: int, uid: str) -> str:
        return f"g/{gen}/ready/{uid}"

    @staticmethod
    def start(gen: int) -> str:
        return f"g/{gen}/start"  # "go" or "abort", written once: every member obeys the same one

    @staticmethod
    def group_prefix(gen: int) -> str:
        return f"g/{gen}/pg/"

    @staticmethod
    def votes(gen: int, seq: int) -> str:
        return f"g/{gen}/vote/{seq}"

    @staticmethod
    def outcome(gen: int, seq: int) -> str:
        return f"g/{gen}/commit/{seq}"


def check_uid(uid: str) -> str:
    """A uid goes into key paths and a comma-separated roster: no '/', ',' or blanks."""
    if not uid or any(c in uid for c in "/, \t\n"):
        raise ValueError(f"member uid {uid!r} must be non-empty without '/', ',' or whitespace (e.g. 'node2.rank1')")
    return uid


def parse_roster(raw: bytes | str) -> list[str]:
    """The uids of an appended roster, first arrival first, each once."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    seen: list[str] = []
    for uid in text.split(","):
        if uid and uid not in seen:
            seen.append(uid)
    return seen


@dataclass(frozen=True)
class JoinRecord:
    """What a rank says about itself when it asks to be in a generation."""

    uid: str
    prev_gen: int  # the generation it comes from; -1 for a process that was never in one
    prev_rank: int  # its rank there; for a process never in one, its preferred rank (torchrun's RANK) or -1
    applied: int  # steps whose update it holds; -1 when it holds no state (a replacement)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JoinRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Decision:
    """A closed generation: its members in rank order and the member that sends the state."""

    members: tuple[str, ...]
    source: str | None  # None: no member holds state; the caller falls back to its disk checkpoint
    needs_state: tuple[str, ...]  # members whose state differs from the source's (they receive it)

    @property
    def world_size(self) -> int:
        return len(self.members)

    def to_json(self) -> str:
        return json.dumps({"members": self.members, "source": self.source, "needs_state": self.needs_state})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Decision:
        data = json.loads(raw)
        return cls(tuple(data["members"]), data["source"], tuple(data["needs_state"]))


@dataclass(frozen=True)
class Rules:
    """The policy's numbers, as the close decision needs them."""

    policy: Policy
    world_size: int  # the full world: what `wait` waits for, and the cap for `shrink`
    min_world_size: int  # `shrink` never forms a smaller group
    settle_s: float  # `shrink`: how long after its arrival a rank waits for expected peers


def decide(
    rules: Rules,
    arrivals: Sequence[JoinRecord],
    previous_members: Iterable[str],
    gone: Iterable[str],
    waited_s: float,
) -> Decision | None:
    """Close the generation, or None to keep waiting.

    `arrivals` in roster order; `previous_members` the members of the newest generation
    any arrival comes from; `gone` the uids known lost or silent (heartbeat stale), which
    are neither waited for nor admitted; `waited_s` how long the deciding rank has waited.
    """
    gone_set = set(gone)
    live = [a for a in arrivals if a.uid not in gone_set]
    if not live:
        return None
    if all(a.prev_gen < 0 for a in live):
        needed = rules.world_size  # a first formation needs the full world under either policy
    elif rules.policy == "wait":
        needed = rules.world_size
    else:
        expected = set(previous_members) - gone_set
        arrived = {a.uid for a in live}
        if expected <= arrived or waited_s >= rules.settle_s:
            needed = max(rules.min_world_size, min(len(live), rules.world_size))
        else:
            return None
    if len(live) < needed:
        return None
    members = assign_ranks(live, rules, needed)
    return choose_source(members, {a.uid: a for a in live})


def assign_ranks(live: Sequence[JoinRecord], rules: Rules, size: int) -> tuple[str, ...]:
    """Members in rank order.

    `wait`: a survivor keeps its rank and a newcomer takes a vacated one, so the data
    slot each rank reads (a function of step and rank) is the same as in a run without
    the fault.  `shrink`: survivors keep their relative order, ranks are compacted, and
    newcomers come last.  Ranks from the newest previous generation win a contested slot;
    arrivals beyond `size` wait for the next generation (they are spares).
    """
    # Newest generation first, then newcomers (whose prev_rank is only a preference);
    # the sort is stable, so roster order decides within each.
    by_claim = sorted(live, key=lambda a: -a.prev_gen if a.prev_gen >= 0 else 1)
    if rules.policy == "wait":
        slots: list[str | None] = [None] * size
        placed: set[str] = set()
        for a in by_claim:
            if 0 <= a.prev_rank < size and slots[a.prev_rank] is None:
                slots[a.prev_rank] = a.uid
                placed.add(a.uid)
        rest = iter(a.uid for a in live if a.uid not in placed)
        return tuple(uid if uid is not None else next(rest) for uid in slots)
    survivors = sorted((a for a in live if a.prev_gen >= 0), key=lambda a: (-a.prev_gen, a.prev_rank))
    newcomers = sorted((a for a in live if a.prev_gen < 0), key=lambda a: a.prev_rank if a.prev_rank >= 0 else size)
    return tuple(a.uid for a in [*survivors, *newcomers][:size])


def choose_source(members: tuple[str, ...], records: dict[str, JoinRecord]) -> Decision:
    """The member holding the most applied steps sends; the lowest rank breaks ties.

    The commit vote keeps survivors equal, so the maximum is every survivor's count; a
    rank behind it (a replacement, or one that came back from an older generation)
    receives the state."""
    holders = [uid for uid in members if records[uid].applied >= 0]
    if not holders:
        return Decision(members, None, ())
    source = max(holders, key=lambda uid: (records[uid].applied, -members.index(uid)))
    best = records[source].applied
    return Decision(members, source, tuple(uid for uid in members if records[uid].applied != best))


def keep_global_batch(full_world: int, accumulation: int, world: int) -> int | None:
    """Gradient-accumulation steps that keep `full_world * accumulation` micro-batches per
    step at `world` ranks, or None when it does not divide (the caller then logs the
    smaller effective batch)."""
    total = full_world * accumulation
    return total // world if world > 0 and total % world == 0 else None
