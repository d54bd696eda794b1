"""Which nodes the supervisor replaces on in-band reports alone (inproc_losses)."""

from __future__ import annotations

from fm9g.orchestrator.inproc_losses import LostNode, lost_nodes
from fm9g.rundir.inproc_events import parse_trainer_uid


def gone(t: float, *uids: str) -> dict:
    return {"event": "gone", "t": t, "uids": list(uids), "uid": "n0r0p1", "node_rank": 0}


def rank_exit(t: float, node: int, pid: int) -> dict:
    return {"event": "rank_exit", "t": t, "uid": f"agent-n{node}-7", "node_rank": node, "pid": pid, "code": -9}


def test_a_rank_whose_agent_reported_its_exit_is_not_a_lost_node() -> None:
    records = [rank_exit(10.0, 1, 55), gone(11.0, "n1r0p55")]
    assert lost_nodes(records, now=100.0) == []


def test_a_silent_node_is_lost_once_the_grace_has_passed() -> None:
    records = [gone(11.0, "n1r0p55"), gone(11.5, "n1r0p55", "n2r1p60")]
    assert lost_nodes(records, now=13.0, grace_s=3.0) == []
    assert lost_nodes(records, now=14.6, grace_s=3.0) == [
        LostNode(1, "n1r0p55", 11.0, 11.0),
        LostNode(2, "n2r1p60", 11.5, 11.5),
    ]


def test_an_exit_of_another_process_on_the_node_does_not_excuse_it() -> None:
    arrived = {"event": "arrived", "t": 2.0, "uid": "n1r0p55", "node_rank": 1}
    records = [arrived, rank_exit(10.0, 1, 54), gone(11.0, "n1r0p55")]
    assert lost_nodes(records, now=20.0) == [LostNode(1, "n1r0p55", 11.0, 2.0)]


def test_uids_that_are_not_trainer_uids_are_ignored() -> None:
    assert parse_trainer_uid("n3r1p4242") == (3, 1, 4242)
    for bad in ("agent-n1-7", "node2.rank1", "nXr0p1", ""):
        assert parse_trainer_uid(bad) is None
    assert lost_nodes([gone(1.0, "node2.rank1")], now=100.0) == []
