"""In-process recovery end to end on this machine (supervise.on_node_loss wait/shrink): the
CLI, the local executor, the store job, two node agents, the real trainer.  A fault
mid-run must cost the survivors their processes nothing: the run completes, every step
is trained once, and the loss per step equals an uninterrupted run's.  What happened is
read back from state.db (the imported `inproc` events) and the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fm9g.orchestrator.state import StageStatus
from tests.helpers import runs

pytestmark = pytest.mark.slow  # each test trains the tiny model through the CLI

STEPS = 30
COMMON = (
    "--nodes",
    "2",
    "--set",
    f"train.train_iters={STEPS}",
    "--set",
    "train.save_iters=10",
    "--set",
    "train.step_sleep=0.15",
    "--set",
    "supervise.inproc_hang_timeout=2",
)


REFERENCE: Path | None = None  # the reference run: later runs take its indexes and tokenizer


def inproc(policy: str, *extra: str) -> tuple[str, ...]:
    shared: tuple[str, ...] = ()
    if REFERENCE is not None:  # skipping the index and tokenizer jobs keeps each test short
        shared = (
            "--set",
            f"data.dataset_config={REFERENCE / 'mixture.json'}",
            "--set",
            f"data.tokenizer_path={REFERENCE / 'tokenizer' / 'tokenizer.model'}",
        )
    return (*COMMON, "--set", f"supervise.on_node_loss={policy}", *shared, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run's loss per step (wait and shrink train the same slots)."""
    global REFERENCE
    root = tmp_path_factory.mktemp("reference")
    result = runs.run_tiny(root / "runs", "ref", *inproc("wait"), cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    run = root / "runs" / "ref"
    assert [m["step"] for m in runs.metrics(run)] == list(range(1, STEPS + 1))
    assert {m["world_size"] for m in runs.metrics(run)} == {2}
    REFERENCE = run
    return runs.losses(run)


def rank_pid(run: Path, node_rank: int) -> int:
    """The pid of node `node_rank`'s newest trainer process (from its events file name)."""
    files = sorted((run / "events" / "inproc").glob(f"n{node_rank}r0p*.jsonl"), key=lambda p: p.stat().st_mtime)
    assert files, f"no trainer process of node {node_rank} has written events yet"
    return int(files[-1].stem.rsplit("p", 1)[1])


def processes(*needles: str) -> Iterator[int]:
    """Pids whose command line holds every needle."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(needle in cmdline for needle in needles):
            yield int(entry.name)


def inproc_events(run: Path, name: str) -> list[dict]:
    return [event.data for event in runs.events(run, "inproc") if event.data.get("event") == name]


def inject_after_step(run: Path, step: int) -> None:
    runs.wait_for(lambda: runs.last_step(run) >= step, 300, f"step {step}", interval=0.05)


def finish(proc: subprocess.Popen[str], run: Path) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    stage = runs.stage(run)
    assert stage is not None and stage.status is StageStatus.COMPLETED, out


def assert_trained_once_like(run: Path, reference: dict[int, float]) -> None:
    steps = [m["step"] for m in runs.metrics(run)]
    assert steps == list(range(1, STEPS + 1)), "every step logged exactly once, in order"
    got = runs.losses(run)
    assert max(abs(got[step] - reference[step]) for step in got) <= 1e-5


def status_json(run: Path) -> dict:
    out = subprocess.run(runs.cli("status", str(run), "--json"), capture_output=True, text=True, check=True).stdout
    return json.loads(out)["runs"][0]


def test_wait_killed_rank_is_replaced_alone_and_the_curve_is_unchanged(
    tmp_path: Path, reference: dict[int, float]
) -> None:
    proc = runs.start_tiny(tmp_path / "runs", "w", *inproc("wait"), cwd=tmp_path)
    run = tmp_path / "runs" / "w"
    inject_after_step(run, 8)
    survivor = rank_pid(run, 0)
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    finish(proc, run)
    assert_trained_once_like(run, reference)
    # The survivor kept its process; node 1's agent restarted only its rank, from a peer's state.
    assert {event["uid"] for event in inproc_events(run, "first_step")} == {f"n0r0p{survivor}"}
    received = [e for e in inproc_events(run, "synced") if e["received"]]
    assert [e["node_rank"] for e in received] == [1]
    assert [e["replacement"] for e in inproc_events(run, "rank_restart")] == [True]
    # No node job failed or was resubmitted: the store job and one job per node.
    assert runs.failures(run) == []
    assert sorted((s.role, s.attempt) for s in runs.submissions(run)) == [("master", 1), ("worker", 1)]
    recoveries = status_json(run)["inproc_recoveries"]
    assert [(r["policy"], r["path"], r["steps_lost"], r["finished"]) for r in recoveries] == [("wait", "fast", 1, True)]


def test_store_loss_falls_back_to_the_disk_checkpoint(tmp_path: Path, reference: dict[int, float]) -> None:
    """The fast path forced to fail: the store job dies, every rank gives up in-process
    recovery, the agents restart their ranks from the last checkpoint, and the
    supervisor starts a new store job."""
    proc = runs.start_tiny(tmp_path / "runs", "f", *inproc("wait"), cwd=tmp_path)
    run = tmp_path / "runs" / "f"
    inject_after_step(run, 14)  # past the checkpoint of step 10
    (store,) = processes("fm9g.launchers.store_host", str(run))
    os.kill(store, signal.SIGKILL)
    finish(proc, run)
    # Steps after the checkpoint were trained again: the last record of each step counts.
    assert sorted(runs.losses(run)) == list(range(1, STEPS + 1))
    got = runs.losses(run)
    assert max(abs(got[step] - reference[step]) for step in got) <= 1e-5
    assert {e["node_rank"] for e in inproc_events(run, "recovery_failed")} == {0, 1}
    assert {e["node_rank"] for e in inproc_events(run, "fallback")} == {0, 1}
    assert [e.data["job_id"] for e in runs.events(run, "store_lost")]
    assert len(runs.events(run, "store_submitted")) == 2
    assert "fallback" in [r["path"] for r in status_json(run)["inproc_recoveries"]]


def test_wait_warm_spare_takes_a_frozen_nodes_place(tmp_path: Path, reference: dict[int, float]) -> None:
    """cluster.spares: 1 keeps a third node job warm; when node 1 freezes, the spare is
    admitted in its place as soon as the survivor gives up on it, and node 1's job is
    replaced in the background by what becomes the next spare, which leaves at the end."""
    proc = runs.start_tiny(
        tmp_path / "runs",
        "p",
        # Slower steps (the losses do not depend on them): the background replacement of
        # node 1 has time to be submitted before training ends.
        *inproc("wait", "--set", "cluster.spares=1", "--set", "supervise.repair_local=true"),
        "--set",
        "train.step_sleep=0.5",
        cwd=tmp_path,
    )
    run = tmp_path / "runs" / "p"
    # Whichever two node jobs arrive first form the group; the third waits as the spare.
    (spare,) = [e["node_rank"] for e in runs.wait_for(lambda: runs.inproc_lines(run, "spare"), 300, "a spare")]
    inject_after_step(run, 3)
    frozen = min({1, 2} - {spare})
    (agent,) = processes("fm9g.launchers.node_agent", f"--node-rank {frozen}", str(run))
    os.killpg(os.getpgid(agent), signal.SIGSTOP)
    finish(proc, run)
    assert_trained_once_like(run, reference)
    received = [e for e in inproc_events(run, "synced") if e["received"]]
    assert [e["node_rank"] for e in received] == [spare], "the spare was promoted"
    # Whichever process was rank 0 saved; its checkpoint holds the whole (replicated) model.
    (weights,) = (run / "checkpoints" / str(STEPS)).glob(f"*-{STEPS}.pt")
    assert "input_embedding.weight" in torch.load(weights, map_location="cpu", weights_only=False)
    assert [e.data["node_rank"] for e in runs.events(run, "node_silent")] == [frozen]
    assert ("worker", frozen, 2) in [(s.role, s.node_rank, s.attempt) for s in runs.submissions(run)]
    assert inproc_events(run, "session_closed"), "the last spare left when training ended"


def whole_shapes(run: Path, step: int) -> tuple[dict[str, tuple[int, ...]], list[tuple[int, ...]]]:
    """The model's and the optimizer's exp_avg shapes in the checkpoint of `step`."""
    (weights,) = (run / "checkpoints" / str(step)).glob(f"*-{step}.pt")
    (optimizer,) = (run / "checkpoints" / str(step)).glob("*.rank-*.opt")
    model = torch.load(weights, map_location="cpu", weights_only=False)
    state = torch.load(optimizer, map_location="cpu", weights_only=False)["state"]
    return {k: tuple(v.shape) for k, v in model.items()}, [tuple(s["exp_avg"].shape) for s in state.values()]


def assert_same_curve_counting_rollbacks(run: Path, reference: dict[int, float]) -> list[dict]:
    """Every step trained, with the reference's loss; a step logged twice only where a
    re-shard said it rolled back (a loss that struck a peer copy mid-transfer)."""
    steps = [m["step"] for m in runs.metrics(run)]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    got = runs.losses(run)
    assert max(abs(got[step] - reference[step]) for step in got) <= 1e-5
    reshards = [e for e in inproc_events(run, "resharded") if e["gen"] > 0]
    rolled = max([e["rolled_back"] or 0 for e in reshards] or [0])
    assert len(steps) - STEPS <= rolled
    return reshards


def test_fsdp_wait_a_killed_ranks_shards_come_back_from_its_buddys_copy(
    tmp_path: Path, reference: dict[int, float]
) -> None:
    """model.fsdp: no rank holds another's parameter or Adam shards.  The killed rank's
    come back from the host copy its buddy on the other node kept, and the curve equals
    the uninterrupted (unsharded) run's."""
    # A checkpoint every step: the replacement joins while the survivor owes the whole-state
    # gather for the last step's checkpoint, a collective both must agree to run.
    extra = ("--set", "model.fsdp=true", "--set", "train.save_iters=1")
    proc = runs.start_tiny(tmp_path / "runs", "s", *inproc("wait", *extra), cwd=tmp_path)
    run = tmp_path / "runs" / "s"
    inject_after_step(run, 8)
    survivor = rank_pid(run, 0)
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    finish(proc, run)
    reshards = assert_same_curve_counting_rollbacks(run, reference)
    assert {(e["world_before"], e["world_after"], e["from_copies"]) for e in reshards} == {(2, 2, 1)}
    assert {event["uid"] for event in inproc_events(run, "first_step")} == {f"n0r0p{survivor}"}
    assert runs.failures(run) == []
    # The checkpoints hold whole tensors (assembled from the shards), so any layout loads them.
    model, moments = whole_shapes(run, STEPS)
    assert sorted(moments) == sorted(model.values())


def test_fsdp_shrink_reshards_onto_the_survivor_and_back(tmp_path: Path, reference: dict[int, float]) -> None:
    """model.fsdp with shrink: node 1 freezes; the survivor takes all the shards (and both
    data slots) at world size 1, then re-shards onto two ranks when node 1's replacement
    job joins."""
    # Slow steps (the losses do not depend on them): node 1's replacement job must join
    # before training ends, even on a loaded machine.
    extra = ("--set", "model.fsdp=true", "--set", "supervise.repair_local=true", "--set", "train.step_sleep=0.5")
    proc = runs.start_tiny(tmp_path / "runs", "h", *inproc("shrink", *extra), cwd=tmp_path)
    run = tmp_path / "runs" / "h"
    inject_after_step(run, 5)
    (agent,) = processes("fm9g.launchers.node_agent", "--node-rank 1", str(run))
    os.killpg(os.getpgid(agent), signal.SIGSTOP)
    finish(proc, run)
    reshards = assert_same_curve_counting_rollbacks(run, reference)
    moves = [(e["world_before"], e["world_after"]) for e in sorted(reshards, key=lambda e: e["gen"])]
    assert moves[0] == (2, 1) and moves[-1] == (1, 2)
    assert {m["world_size"] for m in runs.metrics(run)} == {1, 2}
    assert {m["global_batch"] for m in runs.metrics(run)} == {runs.metrics(run)[0]["global_batch"]}
