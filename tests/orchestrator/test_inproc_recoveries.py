"""`inproc_recoveries`: membership event records in, one recovery per fault out."""

from __future__ import annotations

from typing import Any

from fm9g.orchestrator.inproc_recoveries import inproc_recoveries

MEMBERS = ["n0r0p10", "n1r0p11", "n2r0p12", "n3r0p13"]


def ev(event: str, t: float, uid: str, **fields: Any) -> dict[str, Any]:
    node_rank = int(uid[1]) if uid.startswith("n") else 0
    return {"event": event, "t": t, "uid": uid, "node_rank": node_rank, **fields}


def formation(gen: int, t: float, members: list[str], *, stepped: float | None = None) -> list[dict[str, Any]]:
    """Every member forms `gen` (the last one at t + 0.3) and, when `stepped`, commits a first step."""
    records = [
        ev("formed", t + 0.1 * i, uid, gen=gen, rank=i, world_size=len(members), members=members)
        for i, uid in enumerate(members)
    ]
    if stepped is not None:
        records += [ev("first_step", stepped + 0.05 * i, uid, gen=gen, applied=10) for i, uid in enumerate(members)]
    return records


def test_shrink_after_a_killed_rank_is_one_fast_recovery() -> None:
    survivors = MEMBERS[:3]
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("rank_exit", 100.0, "agent-n3-9", node_rank=3, local_rank=0, pid=13, code=-9),
        *(ev("detected", 100.5, uid, gen=1, seq=41, applied=40, reason="peer") for uid in survivors),
        *(ev("gone", 101.0, uid, gen=2, uids=["n3r0p13"]) for uid in survivors),
        *formation(2, 101.5, survivors, stepped=103.0),
        *(ev("synced", 101.9, uid, gen=2, source="n0r0p10", received=False, sync_s=0.0) for uid in survivors),
    ]
    [recovery] = inproc_recoveries(records, "shrink")
    assert recovery.to_json() == {
        "detected_at": 100.0,
        "policy": "shrink",
        "path": "fast",
        "finished": True,
        "phases": {"detected": 0.0, "re_formed": 1.7, "state_synced": None, "first_step": 3.0},
        "total_s": 3.0,
        "steps_lost": 1,  # every survivor discarded the same step
        "generation_before": 1,
        "generation_after": 2,
        "world_before": 4,
        "world_after": 3,
        "lost": ["n3r0p13"],
    }


def test_wait_with_a_replacement_that_receives_state() -> None:
    replacement = "n3r0p99"
    records = [
        *formation(4, 0.0, MEMBERS),
        ev("detected", 50.0, "n0r0p10", gen=4, seq=7, applied=6, reason="timeout"),
        ev("detected", 50.2, "n1r0p11", gen=4, seq=7, applied=6, reason="timeout"),
        ev("arrived", 70.0, replacement, gen=5, applied=0),
        *formation(5, 71.0, [*MEMBERS[:3], replacement], stepped=80.0),
        ev("synced", 75.0, replacement, gen=5, source="n0r0p10", received=True, sync_s=3.5),
        ev("synced", 74.0, "n0r0p10", gen=5, source="n0r0p10", received=False, sync_s=3.0),
    ]
    [recovery] = inproc_recoveries(records, "wait")
    assert recovery.offsets() == {"detected": 0.0, "re_formed": 21.3, "state_synced": 25.0, "first_step": 30.0}
    assert (recovery.world_before, recovery.world_after) == (4, 4)
    assert recovery.path == "fast" and recovery.steps_lost == 1


def test_a_second_fault_inside_a_recovery_is_the_same_recovery() -> None:
    three, two = MEMBERS[:3], MEMBERS[:2]
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("detected", 10.0, "n0r0p10", gen=1, seq=5, applied=4, reason="peer"),
        *formation(2, 11.0, three),  # re-formed, but n2 dies before the first step
        ev("detected", 12.0, "n0r0p10", gen=2, seq=5, applied=4, reason="peer"),
        ev("gone", 13.0, "n0r0p10", gen=3, uids=["n2r0p12"]),
        *formation(3, 13.5, two, stepped=15.0),
    ]
    [recovery] = inproc_recoveries(records, "shrink")
    assert (recovery.generation_before, recovery.generation_after) == (1, 3)
    assert (recovery.world_before, recovery.world_after) == (4, 2)
    assert recovery.steps_lost == 2 and recovery.total_s == 5.0


def test_two_faults_with_progress_between_are_two_recoveries() -> None:
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("detected", 10.0, "n0r0p10", gen=1, seq=5, applied=4, reason="peer"),
        *formation(2, 11.0, MEMBERS[:3], stepped=12.0),
        ev("detected", 20.0, "n0r0p10", gen=2, seq=9, applied=8, reason="peer"),
        *formation(3, 21.0, MEMBERS[:2], stepped=22.0),
    ]
    first, second = inproc_recoveries(records, "shrink")
    assert (first.generation_after, second.generation_before, second.generation_after) == (2, 2, 3)
    assert (first.world_after, second.world_after) == (3, 2)


def test_a_recovery_in_progress_shows_what_it_reached() -> None:
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("detected", 10.0, "n0r0p10", gen=1, seq=5, applied=4, reason="peer"),
        *formation(2, 12.0, MEMBERS[:3]),
    ]
    [recovery] = inproc_recoveries(records, "shrink")
    assert not recovery.finished and recovery.total_s is None
    assert recovery.to_json()["phases"] == {"detected": 0.0, "re_formed": 2.2, "state_synced": None, "first_step": None}
    assert recovery.to_json()["generation_after"] == 2


def test_a_fallback_inside_marks_the_path() -> None:
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("detected", 10.0, "n0r0p10", gen=1, seq=5, applied=4, reason="peer"),
        ev("recovery_failed", 40.0, "n0r0p10", reason="join timeout"),
        ev("fallback", 40.5, "agent-n0-9", local_rank=0, reason="exit 76"),
        *formation(2, 60.0, MEMBERS, stepped=70.0),
    ]
    [recovery] = inproc_recoveries(records, "wait")
    assert recovery.path == "fallback" and recovery.total_s == 60.0


def test_quiet_events_and_clean_exits_open_nothing() -> None:
    records = [
        *formation(1, 0.0, MEMBERS, stepped=1.0),
        ev("batch", 0.5, "n0r0p10", gen=1, world_size=4, slots=[0], global_batch=8),
        ev("rank_exit", 90.0, "agent-n0-9", node_rank=0, local_rank=0, pid=10, code=0),
    ]
    assert inproc_recoveries(records, "wait") == []


def test_late_reports_of_a_handled_loss_join_that_recovery() -> None:
    records = [
        *formation(1, 0.0, MEMBERS),
        ev("detected", 10.0, "n0r0p10", gen=1, seq=5, applied=4, reason="peer"),
        ev("gone", 10.5, "n0r0p10", gen=2, uids=["n3r0p13"]),
        *formation(2, 11.0, MEMBERS[:3], stepped=12.0),
        # the dead rank's agent and a slow survivor report after the survivors stepped
        ev("rank_exit", 13.0, "agent-n3-9", node_rank=3, local_rank=0, pid=13, code=-9),
        ev("detected", 13.5, "n2r0p12", gen=1, seq=5, applied=4, reason="peer"),
    ]
    [recovery] = inproc_recoveries(records, "shrink")
    assert recovery.lost == ["n3r0p13"] and recovery.steps_lost == 1


def test_records_are_ordered_by_time_not_by_file() -> None:
    by_file = sorted(
        [
            *formation(1, 0.0, MEMBERS),
            ev("detected", 10.0, "n1r0p11", gen=1, seq=5, applied=4, reason="peer"),
            *formation(2, 11.0, MEMBERS[:3], stepped=12.0),
        ],
        key=lambda record: record["uid"],
    )
    [recovery] = inproc_recoveries(by_file, "shrink")
    assert recovery.detected == 10.0 and recovery.finished


def test_a_sharded_restore_from_an_older_copy_counts_the_rolled_back_steps() -> None:
    """FSDP2 state: a loss during a peer copy leaves the previous copy, one step older; the
    step trained again counts as lost beside the discarded one."""
    survivor, replacement = "n0r0p10", "n1r0p99"
    records = [
        *formation(2, 0.0, MEMBERS[:2]),
        ev("detected", 30.0, survivor, gen=2, applied=12, reason="snapshot copy failed"),
        ev("detected", 30.4, survivor, gen=2, seq=13, applied=12, reason="peer"),
        *formation(3, 31.0, [survivor, replacement], stepped=32.0),
        ev("resharded", 31.5, survivor, gen=3, step=11, world_before=2, world_after=2, rolled_back=1),
        ev("resharded", 31.5, replacement, gen=3, step=11, world_before=2, world_after=2, rolled_back=None),
    ]
    [recovery] = inproc_recoveries(records, "wait")
    assert recovery.steps_lost == 2 and recovery.rolled_back == 1
    assert recovery.to_json()["steps_lost"] == 2
