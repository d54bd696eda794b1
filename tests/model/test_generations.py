"""In-process recovery (fm9g.model.generations) with real processes: gloo on 127.0.0.1,
a TCPStore hosted by the test (standing in for the run's store host), ranks started
from a torch-preloaded forkserver (tests/helpers/generations_worker.py).

Every assertion reads the ranks' own records (one JSON line per applied step and per
membership event).  Timings are printed, never asserted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fm9g.model.generation_heartbeats import kill_lost_here, lost_members
from fm9g.model.generation_rules import (
    Decision,
    JoinRecord,
    Rules,
    decide,
    keep_global_batch,
)
from fm9g.model.generation_state import StateSyncError, describe, rebuild
from fm9g.model.generations import Membership, MembershipConfig
from tests.helpers.generations_worker import Ranks, read_log, reference_losses, serve_store, wait_for

STEPS = 24
FAST = {  # small bounds so every scenario stays within seconds on 2 cores
    "heartbeat_interval_s": 0.1,
    "absent_after_s": 0.6,
    "hang_timeout_s": 1.5,
    "settle_s": 1.5,
    "collective_timeout_s": 60.0,  # far above everything: a hang must be ended by the heartbeat path
    "join_timeout_s": 30.0,
}


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    yield server


@pytest.fixture(scope="module")
def starter() -> Ranks:
    return Ranks()  # one forkserver (torch imported once) for the whole module


@pytest.fixture
def ranks(starter: Ranks) -> Iterator[Ranks]:
    yield starter
    starter.close()


def spec(store: dist.TCPStore, tmp: Path, uid: str, policy: str, world: int, **extra: Any) -> dict[str, Any]:
    config = {**FAST, "policy": policy, "world_size": world, **extra.pop("config", {})}
    return {
        "host": "127.0.0.1",
        "port": store.port,
        "uid": uid,
        "log": str(tmp / f"{uid}.jsonl"),
        "steps": STEPS,
        "config": config,
        "step_sleep": 0.03,
        "rank_hint": int(uid[1:]) if extra.get("fresh", True) else None,  # as torchrun's RANK would give
        **extra,
    }


def applied(tmp: Path, uid: str) -> list[dict[str, Any]]:
    return [r for r in read_log(tmp / f"{uid}.jsonl") if r["kind"] == "applied"]


def events(tmp: Path, uid: str, name: str) -> list[dict[str, Any]]:
    return [r for r in read_log(tmp / f"{uid}.jsonl") if r["kind"] == "event" and r["event"] == name]


def reached(step: int) -> Any:
    return lambda records: any(r["kind"] == "applied" and r["step"] >= step for r in records)


def finished(records: list[dict[str, Any]]) -> bool:
    return any(r["kind"] == "done" for r in records)


def check_exactly_once(tmp: Path, uid: str, first: int = 0) -> list[dict[str, Any]]:
    """Every step from `first` to the end applied once by `uid`, in order."""
    steps = applied(tmp, uid)
    assert [r["step"] for r in steps] == list(range(first, STEPS)), f"{uid} applied {[r['step'] for r in steps]}"
    return steps


def check_losses(records: list[dict[str, Any]], reference: list[float]) -> None:
    for r in records:
        assert abs(r["loss"] - reference[r["step"]]) < 1e-5, f"step {r['step']}: {r['loss']} vs {reference[r['step']]}"


def check_shrunk(records: list[dict[str, Any]], uid: str, *, before: int, after: int) -> None:
    """World `before` until the re-form, `after` from then on.  Split by step order, not at
    the kill's timestamp: a step every rank committed just before the kill may be logged a
    moment after it."""
    worlds = [r["world"] for r in records]
    assert after in worlds, f"{uid} never re-formed without the lost ranks: {worlds}"
    shrunk = worlds.index(after)
    assert set(worlds[:shrunk]) == {before} and set(worlds[shrunk:]) == {after}, f"{uid}: {worlds}"


def pause_after(tmp: Path, uid: str, fault_t: float) -> float:
    """Seconds from the fault to `uid`'s first step applied after it."""
    return min(r["t"] for r in applied(tmp, uid) if r["t"] > fault_t) - fault_t


# -- pure parts -------------------------------------------------------------------------


def rec(uid: str, prev_gen: int = 0, prev_rank: int = 0, applied: int = 5) -> JoinRecord:
    return JoinRecord(uid, prev_gen, prev_rank, applied)


def test_wait_keeps_survivor_ranks_and_fills_the_hole_with_the_newcomer() -> None:
    rules = Rules("wait", 3, 1, 1.0)
    survivors = [rec("a", 0, 0), rec("c", 0, 2)]
    assert decide(rules, survivors, ("a", "b", "c"), {"b"}, waited_s=99) is None  # wait: never below the full world
    decision = decide(rules, [*survivors, rec("new", -1, -1, -1)], ("a", "b", "c"), {"b"}, waited_s=0)
    assert decision == Decision(("a", "new", "c"), "a", ("new",))


def test_shrink_closes_when_the_missing_peer_is_silent_or_the_settle_time_passed() -> None:
    rules = Rules("shrink", 3, 1, 2.0)
    arrivals = [rec("c", 0, 2), rec("a", 0, 0)]
    assert decide(rules, arrivals, ("a", "b", "c"), set(), waited_s=0.1) is None  # b still beats: wait for it
    assert decide(rules, arrivals, ("a", "b", "c"), {"b"}, waited_s=0.1) == Decision(("a", "c"), "a", ())
    assert decide(rules, arrivals, ("a", "b", "c"), set(), waited_s=2.0) == Decision(("a", "c"), "a", ())


def test_a_first_formation_grants_rank_hints() -> None:
    rules = Rules("wait", 3, 1, 0.0)
    first = [rec("c", -1, 2, 0), rec("a", -1, 0, 0), rec("b", -1, 1, 0)]
    assert decide(rules, first, (), set(), waited_s=0) == Decision(("a", "b", "c"), "a", ())
    assert decide(Rules("shrink", 3, 1, 0.0), first, (), set(), waited_s=0) == Decision(("a", "b", "c"), "a", ())


def test_a_first_formation_needs_the_full_world_and_the_most_advanced_member_sends() -> None:
    rules = Rules("shrink", 2, 1, 0.0)
    assert decide(rules, [rec("a", -1, -1, 0)], (), set(), waited_s=99) is None
    behind = decide(rules, [rec("a", 3, 0, 7), rec("b", 1, 1, 6)], ("a", "b"), set(), waited_s=0)
    assert behind == Decision(("a", "b"), "a", ("b",))
    nobody = decide(rules, [rec("a", -1, -1, -1), rec("b", -1, -1, -1)], (), set(), waited_s=0)
    assert nobody is not None and nobody.source is None


def test_global_batch_through_accumulation() -> None:
    assert keep_global_batch(4, 3, 3) == 4
    assert keep_global_batch(4, 1, 3) is None


def test_payload_round_trip_keeps_int_keys_tuples_and_dtypes() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7, "loader": {"cursor": [1, 2]}}
    skeleton, tensors = describe(state)
    back = rebuild(skeleton, [t.clone() for t in tensors])
    assert back["opt"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["opt"]["state"]) == {0, 1}
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["step"] == 7 and back["loader"] == {"cursor": [1, 2]}
    with pytest.raises(StateSyncError, match="opt.bad"):
        describe({"opt": {"bad": object()}})


# -- real processes --------------------------------------------------------------------


def test_kill9_shrink_survivors_reform_and_train_every_step_once(store, ranks, tmp_path) -> None:
    uids = ["r0", "r1", "r2"]
    for uid in uids:
        ranks.start(spec(store, tmp_path, uid, "shrink", 3))
    wait_for(tmp_path / "r2.jsonl", reached(6))
    victim = ranks.processes[2]
    os.kill(victim.pid or 0, signal.SIGKILL)
    killed_at = time.time()
    for uid in uids[:2]:
        wait_for(tmp_path / f"{uid}.jsonl", finished)
    reference = reference_losses(STEPS)
    for uid in uids[:2]:
        steps = check_exactly_once(tmp_path, uid)
        check_losses(steps, reference)  # 12 micro-batches per step at world 3 and at world 2
        check_shrunk(steps, uid, before=3, after=2)
        assert events(tmp_path, uid, "detected"), f"{uid} never saw the fault"
        print(f"{uid}: pause after kill -9: {pause_after(tmp_path, uid, killed_at):.3f} s")


def test_kill9_wait_replacement_gets_state_from_a_survivor_and_the_loss_curve_is_unchanged(
    store, ranks, tmp_path
) -> None:
    uids = ["r0", "r1", "r2"]
    for uid in uids:
        ranks.start(spec(store, tmp_path, uid, "wait", 3))
    wait_for(tmp_path / "r2.jsonl", reached(6))
    os.kill(ranks.processes[2].pid or 0, signal.SIGKILL)
    for uid in uids[:2]:  # the survivors wait, warm, in generation 1
        wait_for(tmp_path / f"{uid}.jsonl", lambda rs: any(r.get("event") == "arrived" and r["gen"] == 1 for r in rs))
    joined_at = time.time()
    ranks.start(spec(store, tmp_path, "r3", "wait", 3, fresh=False))
    for uid in ["r0", "r1", "r3"]:
        wait_for(tmp_path / f"{uid}.jsonl", finished)
    reference = reference_losses(STEPS)
    for uid in uids[:2]:
        check_losses(check_exactly_once(tmp_path, uid), reference)
    newcomer = applied(tmp_path, "r3")
    first = newcomer[0]["step"]
    assert check_exactly_once(tmp_path, "r3", first) and first > 6
    check_losses(newcomer, reference)  # equal to the uninterrupted run on every rank, within 1e-5
    assert {r["rank"] for r in newcomer} == {2}  # the lost rank's slot, so its data slot too
    synced = events(tmp_path, "r3", "synced")
    assert synced and synced[0]["received"] and synced[0]["source"] == "r0"
    pause = min(r["t"] for r in applied(tmp_path, "r0") if r["t"] > joined_at) - joined_at
    print(f"wait: survivors idle from the kill until a replacement joins; after it started: {pause:.3f} s")
    print(f"      state sync at the join: {synced[0]['sync_s']:.3f} s")


def test_a_warm_spare_takes_the_lost_rank_slot_at_once(store, ranks, tmp_path) -> None:
    for uid in ("r0", "r1", "r2"):
        ranks.start(spec(store, tmp_path, uid, "wait", 3))
    wait_for(tmp_path / "r0.jsonl", reached(2))
    ranks.start(spec(store, tmp_path, "s9", "wait", 3, fresh=False))  # finds the world full: waits as a spare
    wait_for(tmp_path / "s9.jsonl", lambda rs: any(r.get("event") == "spare" for r in rs))
    os.kill(ranks.processes[1].pid or 0, signal.SIGKILL)
    killed_at = time.time()
    for uid in ("r0", "r2", "s9"):
        wait_for(tmp_path / f"{uid}.jsonl", finished)
    reference = reference_losses(STEPS)
    for uid in ("r0", "r2"):
        check_losses(check_exactly_once(tmp_path, uid), reference)
    spare = applied(tmp_path, "s9")
    check_exactly_once(tmp_path, "s9", spare[0]["step"])
    check_losses(spare, reference)
    assert {r["rank"] for r in spare} == {1}
    print(f"spare promoted: survivors' pause {pause_after(tmp_path, 'r0', killed_at):.3f} s")


def test_two_faults_inside_one_recovery(store, ranks, tmp_path) -> None:
    uids = ["r0", "r1", "r2", "r3"]
    for uid in uids:
        # r2 dies once it has asked to join generation 1, i.e. in the middle of the recovery from r3's loss.
        ranks.start(spec(store, tmp_path, uid, "shrink", 4, **({"die_on": ["arrived", 1]} if uid == "r2" else {})))
    wait_for(tmp_path / "r3.jsonl", reached(6))
    os.kill(ranks.processes[3].pid or 0, signal.SIGKILL)
    killed_at = time.time()
    for uid in uids[:2]:
        wait_for(tmp_path / f"{uid}.jsonl", finished)
    reference = reference_losses(STEPS)
    assert ranks.processes[2].exitcode == -signal.SIGKILL
    assert any(r["gen"] == 1 for r in events(tmp_path, "r2", "arrived"))
    for uid in uids[:2]:
        steps = check_exactly_once(tmp_path, uid)
        check_losses(steps, reference)
        check_shrunk(steps, uid, before=4, after=2)
        print(f"{uid}: two faults, pause {pause_after(tmp_path, uid, killed_at):.3f} s")


def test_sigstop_rank_is_declared_lost_by_heartbeat_killed_and_the_others_continue(store, ranks, tmp_path) -> None:
    uids = ["r0", "r1", "r2"]
    for uid in uids:
        ranks.start(spec(store, tmp_path, uid, "shrink", 3))
    wait_for(tmp_path / "r1.jsonl", reached(6))
    os.kill(ranks.processes[1].pid or 0, signal.SIGSTOP)
    stopped_at = time.time()
    agent_view = dist.PrefixStore("inproc/", store)
    killed: set[str] = set()
    deadline = time.monotonic() + 30
    while "r1" not in killed and time.monotonic() < deadline:  # the agent's loop: kill lost ranks on this host
        kill_lost_here(agent_view, killed, host=os.uname().nodename)
        time.sleep(0.05)
    killed_at = time.time()
    for uid in ("r0", "r2"):
        wait_for(tmp_path / f"{uid}.jsonl", finished)
    [lost] = lost_members(agent_view)
    assert lost.uid == "r1" and lost.by in {"r0", "r2"} and lost.silent_s >= FAST["hang_timeout_s"]
    reference = reference_losses(STEPS)
    for uid in ("r0", "r2"):
        check_losses(check_exactly_once(tmp_path, uid), reference)
        # Ended by the kill (a connection error), not by gloo's 60 s collective timeout.
        assert all("Timed out" not in r["reason"] for r in events(tmp_path, uid, "detected"))
    print(
        f"SIGSTOP -> declared lost and killed after {killed_at - stopped_at:.3f} s (hang_timeout {FAST['hang_timeout_s']} s)"
    )
    print(f"SIGSTOP -> survivors' next step after {pause_after(tmp_path, 'r0', stopped_at):.3f} s")


def test_fifty_generations_leave_memory_threads_and_files_flat(store, ranks, tmp_path) -> None:
    steps = 110  # a request after one step is acted on at the next step's vote: a generation per 2 steps
    for uid in ("r0", "r1"):
        extra = {"reform_every": 1} if uid == "r0" else {}
        ranks.start(spec(store, tmp_path, uid, "shrink", 2, steps=steps, step_sleep=0, sample_usage=True, **extra))
    for uid in ("r0", "r1"):
        wait_for(tmp_path / f"{uid}.jsonl", finished, timeout_s=120)
    for uid in ("r0", "r1"):
        usage = [r for r in read_log(tmp_path / f"{uid}.jsonl") if r["kind"] == "usage"]
        assert len(usage) >= 50, f"{uid} formed only {len(usage)} generations"
        warm, last = usage[5], usage[-1]
        print(f"{uid}: generation {warm['gen']} -> {last['gen']}: {warm} -> {last}")
        assert last["threads"] <= warm["threads"] + 1
        assert last["fds"] <= warm["fds"] + 2
        assert last["rss_kb"] <= warm["rss_kb"] + 2 * 1024
        assert [r["step"] for r in applied(tmp_path, uid)] == list(range(steps))


def test_store_host_loss_ends_every_rank_with_a_recovery_failure_naming_the_store(ranks, tmp_path) -> None:
    port_file = tmp_path / "store.port"
    host = ranks.start(str(port_file), target=serve_store)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while not port_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    port = int(port_file.read_text())

    class Remote:  # spec() reads only .port
        pass

    remote = Remote()
    remote.port = port  # type: ignore[attr-defined]
    for uid in ("r0", "r1"):
        ranks.start(spec(remote, tmp_path, uid, "shrink", 2, steps=100000))  # type: ignore[arg-type]
    wait_for(tmp_path / "r0.jsonl", reached(4))
    os.kill(host.pid or 0, signal.SIGKILL)
    lost_at = time.time()
    for uid in ("r0", "r1"):
        records = wait_for(tmp_path / f"{uid}.jsonl", lambda rs: any(r["kind"] == "recovery_failed" for r in rs))
        [failure] = [r for r in records if r["kind"] == "recovery_failed"]
        assert f"127.0.0.1:{port}" in failure["error"]
        print(f"{uid}: store host killed -> RecoveryFailed after {failure['t'] - lost_at:.3f} s")


class Counter:
    """A minimal caller state for the in-process lifecycle test."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param(
            "nccl",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="the NCCL path (abort, then re-init) needs a CUDA GPU"
                ),
            ],
        ),
    ],
)
def test_one_process_re_forms_its_group_in_place(store, backend) -> None:
    """The same interface on either backend: each re-form leaves (gloo: destroy; NCCL:
    abort) and builds a fresh group; the caller's objects are untouched."""
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    config = MembershipConfig(policy="shrink", world_size=1, backend=backend, namespace=f"one-{backend}", **FAST)
    state = Counter()
    membership = Membership("127.0.0.1", store.port, "solo", config, state, applied=0, device=device)
    generations = []
    try:
        for _ in range(6):
            with membership.step() as guard:
                total = guard.all_reduce(torch.ones(3, device=device))
                guard.commit()
                state.value += int(total.sum().item())
            generations.append(guard.generation.number)
            if not membership.reform_pending:
                membership.request_reform()
    finally:
        membership.close()
    assert not dist.is_initialized()
    assert state.value == 18 and membership.applied == 6
    assert generations[-1] >= 2 and generations == sorted(generations)
