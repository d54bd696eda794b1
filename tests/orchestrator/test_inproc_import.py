"""`import_inproc_events`: files written by EventWriter into a run directory become
`inproc` events of its state.db, each line once, across imports and supervisors."""

from __future__ import annotations

import json
from pathlib import Path

from fm9g.orchestrator.inproc_import import INPROC_KIND, INPROC_OFFSETS, LOSS_EVENTS, import_inproc_events
from fm9g.orchestrator.state import StateStore
from fm9g.rundir import RunDir
from fm9g.rundir.inproc_events import EventWriter
from tests.orchestrator.test_train_policy import make_case


def inproc_data(store: StateStore) -> list[dict]:
    return [event.data for event in store.events(kind=INPROC_KIND)]


def test_import_reads_each_complete_line_once(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "r").make()
    store = StateStore(run.state_db)
    trainer = EventWriter(run.inproc_events, "n1r0p123", node_rank=1)
    agent = EventWriter(run.inproc_events, "agent-n1-77", node_rank=1)
    trainer("formed", {"gen": 3, "rank": 1, "world_size": 4, "members": ["a", "b", "c", "d"]})
    agent("rank_restart", {"local_rank": 0, "replacement": True, "reason": "start"})
    # a writer killed mid-write leaves a torn last line
    with open(run.inproc_events / "n2r0p124.jsonl", "wb") as handle:
        handle.write(json.dumps({"event": "arrived", "t": 1.0, "uid": "n2r0p124", "node_rank": 2, "gen": 3}).encode())
        handle.write(b"\n" + b'{"event": "formed", "t": 2.0, "ui')

    assert import_inproc_events(run, store) == 3
    events = store.events(kind=INPROC_KIND)
    assert [(e.data["event"], e.data["uid"]) for e in events] == [
        ("arrived", "n2r0p124"),  # oldest first, by the record's time
        ("formed", "n1r0p123"),
        ("rank_restart", "agent-n1-77"),
    ]
    formed = events[1]
    assert formed.stage == "train" and formed.message == "n1r0p123: formed gen 3 (world 4)"
    assert {key: formed.data[key] for key in ("gen", "rank", "world_size", "node_rank")} == {
        "gen": 3,
        "rank": 1,
        "world_size": 4,
        "node_rank": 1,
    }

    assert import_inproc_events(run, store) == 0  # nothing new
    assert len(inproc_data(store)) == 3

    with open(run.inproc_events / "n2r0p124.jsonl", "ab") as handle:  # the torn line, finished
        handle.write(b'd": "n2r0p124", "node_rank": 2, "gen": 3, "world_size": 4}\n')
    assert import_inproc_events(run, store) == 1
    assert inproc_data(store)[-1]["event"] == "formed" and inproc_data(store)[-1]["uid"] == "n2r0p124"

    trainer("detected", {"gen": 3, "seq": 8, "applied": 7, "reason": "peer"})
    trainer("gone", {"gen": 4, "uids": ["n2r0p124"]})
    agent("rank_restart", {"local_rank": 0, "replacement": False, "reason": "lost"})
    assert import_inproc_events(run, store, counting=LOSS_EVENTS) == 2  # two of the three are losses
    assert [d["event"] for d in inproc_data(store)][4:] == ["detected", "gone", "rank_restart"]
    trainer.close()
    agent.close()
    store.close()


def test_a_new_supervisor_imports_nothing_twice(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "r").make()
    writer = EventWriter(run.inproc_events, "n0r0p5", node_rank=0)
    writer("formed", {"gen": 1, "rank": 0, "world_size": 1, "members": ["n0r0p5"]})
    first = StateStore(run.state_db)
    assert import_inproc_events(run, first) == 1
    first.close()

    writer("first_step", {"gen": 1, "applied": 1})
    again = StateStore(run.state_db)  # the supervisor restarted: offsets come from state.db
    assert import_inproc_events(run, again) == 1
    assert [d["event"] for d in inproc_data(again)] == ["formed", "first_step"]
    assert again.meta(INPROC_OFFSETS) == {"n0r0p5.jsonl": (run.inproc_events / "n0r0p5.jsonl").stat().st_size}
    writer.close()
    again.close()


def test_a_run_without_inproc_events_imports_nothing(tmp_path: Path) -> None:
    run = RunDir.of(tmp_path / "r").make()
    store = StateStore(run.state_db)
    assert import_inproc_events(run, store) == 0
    assert store.events(kind=INPROC_KIND) == [] and store.meta(INPROC_OFFSETS) is None
    store.close()


def test_an_in_band_loss_resets_the_supervisors_poll_interval(tmp_path: Path) -> None:
    case = make_case(tmp_path)
    case.running()
    for _ in range(4):  # nothing changes: the poll backs off
        case.tick()
    assert case.policy.interval > case.policy.base_interval
    writer = EventWriter(case.run.inproc_events, "n1r0p7", node_rank=1)
    writer("batch", {"gen": 1, "world_size": 2, "slots": [1], "global_batch": 8})
    case.tick()
    assert case.policy.interval > case.policy.base_interval  # routine events are no news
    writer("detected", {"gen": 1, "seq": 12, "applied": 11, "reason": "peer"})
    case.tick()
    assert case.policy.interval == case.policy.base_interval
    assert [event.data["event"] for event in case.store.events(kind=INPROC_KIND)] == ["batch", "detected"]
    writer.close()
