"""Checkpoint layout, atomic visibility, coordination across ranks, resolving and pruning."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from fm9g.model.checkpoint import MARKER, Checkpointer, CheckpointError


def save(ckpt: Checkpointer, step: int, value: float = 1.0, blocking: bool = True) -> Path:
    return ckpt.save(
        step,
        model={"w": torch.full((2,), value)},
        optimizer={"rank": ckpt.rank},
        data={"position": step * 10 + ckpt.rank},
        trainer={"step": step},
        log={"iteration": step},
        config={"dim_model": 4},
        blocking=blocking,
    )


def two_ranks(root: Path, action) -> list[Checkpointer]:
    """Run `action(ckpt)` on two ranks (threads sharing a barrier), re-raising failures."""
    barrier = threading.Barrier(2, timeout=30)
    ckpts = [Checkpointer(root, rank, 2, barrier.wait) for rank in range(2)]
    errors: list[BaseException] = []

    def body(ckpt: Checkpointer) -> None:
        try:
            action(ckpt)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(c,)) for c in ckpts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ckpts


def test_fm9g_layout_written_by_two_ranks(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    two_ranks(root, lambda c: save(c, 5))
    step = root / "5"
    names = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert names == sorted(
        [
            "fm9g_live_checkpoint-5.pt",
            "fm9g_live_checkpoint-5.rank-0.opt",
            "fm9g_live_checkpoint-5.rank-1.opt",
            "fm9g_live_checkpoint-5.log_ckpt",
            "dataset_ckpt/dataset_0.data",
            "dataset_ckpt/dataset_1.data",
            "trainer_state.pt",
            "config.json",
            MARKER,
        ]
    )
    assert (root / "latest").read_text().strip() == "5"
    assert json.loads((step / MARKER).read_text())["world_size"] == 2
    assert not list(root.glob(".tmp-*"))
    loaded = Checkpointer(root, 1, 2, lambda: None)
    assert loaded.latest() == step and loaded.step_of(step) == 5
    assert loaded.load_optimizer(step) == {"rank": 1}
    assert loaded.load_data(step) == {"position": 51}
    assert Checkpointer(root, 0, 3, lambda: None).load_data(step) is None  # other world size
    assert Checkpointer(root, 2, 3, lambda: None).load_optimizer(step) == {"rank": 0}  # rank % saved
    torch.testing.assert_close(loaded.load_model(step)["w"], torch.ones(2))


def test_rename_waits_for_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    seen: dict[str, bool] = {}

    def action(ckpt: Checkpointer) -> None:
        if ckpt.rank == 1:
            original = ckpt._write_files

            def slow(tmp, step, payload, tokenizer):
                import time

                time.sleep(0.3)
                seen["visible_before_rank1_wrote"] = (root / "3").exists()
                original(tmp, step, payload, tokenizer)

            ckpt._write_files = slow
        save(ckpt, 3)

    two_ranks(root, action)
    assert seen == {"visible_before_rank1_wrote": False}
    assert (root / "3" / "fm9g_live_checkpoint-3.rank-1.opt").exists()


def test_incomplete_checkpoints_are_never_used(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, 0, 1, lambda: None)
    save(ckpt, 2)
    # A crash mid-save leaves a temporary dir; a copied dir without marker is not complete either.
    (root / ".tmp-4").mkdir()
    partial = root / "6"
    partial.mkdir()
    (partial / "fm9g_live_checkpoint-6.pt").write_bytes(b"truncated")
    (root / "latest").write_text("6\n")
    assert ckpt.latest() == root / "2"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.resolve("6")
    assert ckpt.resolve("2") == root / "2"
    save(ckpt, 4)  # the leftover .tmp-4 is replaced
    assert ckpt.latest() == root / "4" and ckpt.complete_steps() == [2, 4]


def test_async_save_becomes_visible_at_finish(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, 0, 1, lambda: None)
    model = {"w": torch.zeros(3)}
    ckpt.save(7, model=model, optimizer={}, data=None, trainer={}, log=None, config={}, blocking=False)
    model["w"].add_(1)  # training goes on; the snapshot must not change
    ckpt.finish()
    assert ckpt.latest() == root / "7"
    torch.testing.assert_close(ckpt.load_model(root / "7")["w"], torch.zeros(3))


def test_resave_same_step_and_keep_last(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, 0, 1, lambda: None, keep_last=2)
    for step in (1, 2, 3):
        save(ckpt, step, value=float(step))
    assert ckpt.complete_steps() == [2, 3]
    save(ckpt, 3, value=9.0)
    assert ckpt.complete_steps() == [2, 3]
    assert float(ckpt.load_model(root / "3")["w"][0]) == 9.0
    assert not list(root.glob(".old-*"))
