"""Whole nodes lost, told in-band (supervise.on_node_loss wait/shrink).

A trainer reports a peer `gone` (its heartbeat went silent) about a second after the peer
stopped.  If the peer's own node agent is alive, it reports the rank's exit (`rank_exit`
with that pid) at once, restarts it, and the node keeps its job.  If nothing on that node
says a word for `grace_s` after the report, the node itself is gone: its link is down, or
it froze, or it lost power.  Slurm may take minutes to call that NODE_FAIL
(SlurmdTimeout), so the supervisor cancels the node's job itself and replaces it now.

Pure: the records are the `inproc` events' data, as imported into state.db.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fm9g.rundir.inproc_events import parse_trainer_uid

LOST_SIGNS = frozenset({"arrived", "gone", "rank_exit"})  # the only records lost_nodes reads
GRACE_S = 3.0  # a live agent reports its rank's exit within a poll (0.1 s); this is ample


@dataclass(frozen=True)
class LostNode:
    node_rank: int
    uid: str  # the trainer process reported gone
    since: float  # when it was first reported gone
    joined: float  # when that process first asked to join: the job hosting it started before


def lost_nodes(records: Iterable[Mapping[str, Any]], now: float, grace_s: float = GRACE_S) -> list[LostNode]:
    """Nodes with a rank reported gone at least `grace_s` ago whose agent never reported
    that rank's exit; one entry per node, its earliest such report."""
    gone: dict[str, float] = {}
    joined: dict[str, float] = {}
    exited: set[tuple[int, int]] = set()
    for record in records:
        event = record.get("event")
        if event == "arrived" and isinstance(record.get("uid"), str):
            when = float(record.get("t") or 0.0)
            joined[record["uid"]] = min(when, joined.get(record["uid"], when))
        elif event == "gone":
            for uid in record.get("uids") or []:
                when = float(record.get("t") or 0.0)
                gone[str(uid)] = min(when, gone.get(str(uid), when))
        elif event == "rank_exit" and isinstance(record.get("pid"), int) and isinstance(record.get("node_rank"), int):
            exited.add((record["node_rank"], record["pid"]))
    found: dict[int, LostNode] = {}
    for uid, since in gone.items():
        parsed = parse_trainer_uid(uid)
        if parsed is None or now - since < grace_s:
            continue
        node, _local, pid = parsed
        if (node, pid) in exited:
            continue
        if node not in found or since < found[node].since:
            found[node] = LostNode(node, uid, since, joined.get(uid, since))
    return sorted(found.values(), key=lambda lost: lost.node_rank)
