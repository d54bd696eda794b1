"""Checkpoints in the FM9G layout: the only module that reads or writes checkpoint files.

    checkpoints/<step>/
      fm9g_live_checkpoint-<step>.pt            model state dict (rank 0; FM9G keys)
      fm9g_live_checkpoint-<step>.rank-<r>.opt  optimizer state of rank r
      fm9g_live_checkpoint-<step>.log_ckpt      JSON: iteration, token counts
      dataset_ckpt/dataset_<r>.data             data position of rank r
      trainer_state.pt                          scheduler, step, RNG states of every rank
      config.json                               model config (cpm_dragonfly form)
      tokenizer/                                the tokenizer files, when given
      COMPLETE                                  marker, written last (JSON: step, world_size)
    checkpoints/latest                          text: the step of the newest complete one

Every rank writes its files into `checkpoints/.tmp-<step>/`; after a barrier rank 0
writes the marker, renames the directory to `<step>/` and then atomically replaces
`latest`.  A directory without the marker (a crash mid-save, a half copy) is never
loaded: `find` falls back to the newest complete step.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fm9g.rundir.atomic import replace_dir, write_json, write_text

SAVE_NAME = "fm9g_live_checkpoint"
MARKER = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used; the message says which and why."""


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (a snapshot an async writer may hold)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


def _save(obj: Any, path: Path) -> None:
    """torch.save through a file object we opened: on a full disk torch raises a bare
    RuntimeError for a path, but for a file object the OSError (ENOSPC) stays its context."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def discard_partial(root: Path) -> None:
    """Remove half-written `.tmp-<step>` checkpoint folders (after a failed save; never loaded)."""
    for tmp in Path(root).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


class Checkpointer:
    """Saves and finds checkpoints under one `checkpoints/` directory for one rank."""

    def __init__(self, root: Path, rank: int, world_size: int, barrier: Callable[[], None], keep_last: int = 0) -> None:
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.barrier = barrier
        self.keep_last = keep_last
        self._pending: tuple[int, threading.Thread, list[BaseException]] | None = None

    # ------------------------------------------------------------------ paths
    def step_dir(self, step: int) -> Path:
        return self.root / str(step)

    def _tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step}"

    @staticmethod
    def is_complete(path: Path) -> bool:
        """True when `path` is a checkpoint directory whose save finished."""
        return (path / MARKER).is_file()

    def complete_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending."""
        if not self.root.is_dir():
            return []
        steps = [int(p.name) for p in self.root.iterdir() if p.name.isdigit() and self.is_complete(p)]
        return sorted(steps)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it names one, else the highest complete step."""
        pointer = self.root / LATEST
        if pointer.is_file():
            text = pointer.read_text(encoding="utf-8").strip()
            if text.isdigit() and self.is_complete(self.step_dir(int(text))):
                return self.step_dir(int(text))
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def resolve(self, spec: str) -> Path:
        """A checkpoint by step number (of this run) or by directory path; it must be complete."""
        path = self.step_dir(int(spec)) if spec.isdigit() else Path(spec).resolve()
        if self._external(path) and not path.name.startswith(".tmp-") and list(path.glob("*.pt")):
            return path  # an FM9G checkpoint from elsewhere (e.g. a released model) has no marker
        if not self.is_complete(path):
            have = self.complete_steps()
            raise CheckpointError(
                f"checkpoint {spec!r} ({path}) does not exist or is incomplete (no {MARKER} marker); "
                f"complete checkpoints of this run: {have or 'none'}"
            )
        return path

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        *,
        model: dict[str, torch.Tensor] | None,
        optimizer: dict[str, Any] | None,
        data: Any,
        trainer: dict[str, Any] | None,
        log: dict[str, Any] | None,
        config: dict[str, Any] | None,
        tokenizer: Any = None,
        blocking: bool = True,
        data_by_rank: dict[int, Any] | None = None,
    ) -> Path:
        """Collective: every rank calls it; rank 0's model/trainer/log/config/tokenizer are used.

        With `blocking=False` the files are written by a thread from a CPU snapshot and the
        checkpoint becomes visible at the next `finish()` (all ranks call it).
        `data_by_rank`: every rank's data position written by this one process (in-process
        recovery: one rank saves alone, holding every data slot's position).
        """
        self.finish()
        final = self.step_dir(step)
        tmp = self._tmp_dir(step)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            (tmp / "dataset_ckpt").mkdir(parents=True)
        self.barrier()
        payload = {
            "model": model,
            "optimizer": optimizer,
            "data": data,
            "trainer": trainer,
            "log": log,
            "config": config,
            "data_by_rank": data_by_rank,
        }
        if blocking:
            self._write_files(tmp, step, payload, tokenizer)
            self._finalize(step)
            return final
        snapshot = _to_cpu(payload)
        errors: list[BaseException] = []

        def write() -> None:
            try:
                self._write_files(tmp, step, snapshot, tokenizer)
            except BaseException as exc:  # noqa: BLE001 -- re-raised by finish() on the training thread
                errors.append(exc)

        thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        thread.start()
        self._pending = (step, thread, errors)
        return final

    def finish(self) -> None:
        """Collective: wait for an async save and make it visible (no-op when none is pending)."""
        if self._pending is None:
            return
        step, thread, errors = self._pending
        self._pending = None
        thread.join()
        if errors:
            raise CheckpointError(f"writing checkpoint {step} failed on rank {self.rank}: {errors[0]}") from errors[0]
        self._finalize(step)

    def _write_files(self, tmp: Path, step: int, payload: dict[str, Any], tokenizer: Any) -> None:
        stem = f"{SAVE_NAME}-{step}"
        if payload["optimizer"] is not None:
            _save(payload["optimizer"], tmp / f"{stem}.rank-{self.rank}.opt")
        if payload["data"] is not None:
            _save(payload["data"], tmp / "dataset_ckpt" / f"dataset_{self.rank}.data")
        for rank, data in (payload["data_by_rank"] or {}).items():
            _save(data, tmp / "dataset_ckpt" / f"dataset_{rank}.data")
        if self.rank != 0:
            return
        _save(payload["model"], tmp / f"{stem}.pt")
        _save(payload["trainer"], tmp / "trainer_state.pt")
        (tmp / f"{stem}.log_ckpt").write_text(json.dumps(payload["log"] or {"iteration": step}, indent=2))
        (tmp / "config.json").write_text(json.dumps(payload["config"] or {}, indent=2))
        if tokenizer is not None:
            tokenizer.save_to(tmp / "tokenizer")

    def _finalize(self, step: int) -> None:
        self.barrier()  # every rank's files are in the temporary directory
        if self.rank == 0:
            tmp, final = self._tmp_dir(step), self.step_dir(step)
            write_json(tmp / MARKER, {"step": step, "world_size": self.world_size, "time": time.time()})
            # The same step saved before (checkpoint-now right after a resume, or a rollback to an
            # older step): move the old one aside first so a complete <step>/ exists at all times
            # except between two renames.
            old = self.root / f".old-{step}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                replace_dir(final, old)
            replace_dir(tmp, final)
            write_text(self.root / LATEST, f"{step}\n")
            shutil.rmtree(old, ignore_errors=True)
            self._prune(step)
        self.barrier()  # nobody moves on (or exits) before the checkpoint is visible

    def _prune(self, newest: int) -> None:
        if self.keep_last <= 0:
            return
        # Only steps up to the newest count: after a rollback, higher steps of the abandoned
        # line are left alone rather than guessed about.
        older = [step for step in self.complete_steps() if step <= newest]
        for step in older[: -self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def step_of(path: Path) -> int:
        """The iteration a checkpoint was written at (its .log_ckpt, else its directory name)."""
        for log in path.glob(f"{SAVE_NAME}-*.log_ckpt"):
            return int(json.loads(log.read_text()).get("iteration"))
        match = re.search(r"(\d+)$", path.name)
        if not match:
            raise CheckpointError(f"{path}: cannot tell the step of this checkpoint")
        return int(match.group(1))

    def _external(self, path: Path) -> bool:
        return not path.is_relative_to(self.root.resolve())

    @staticmethod
    def _one(path: Path, pattern: str) -> Path:
        found = sorted(path.glob(pattern))
        if not found:
            raise CheckpointError(f"{path}: no file matching {pattern!r}")
        return found[0]

    def load_model(self, path: Path) -> dict[str, torch.Tensor]:
        """The model state dict (FM9G keys), on the CPU."""
        files = sorted(path.glob(f"{SAVE_NAME}-*.pt")) or sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise CheckpointError(
                f"{path}: expected one model file {SAVE_NAME}-<step>.pt, found {[f.name for f in files]}"
            )
        return torch.load(files[0], map_location="cpu", weights_only=True)

    def load_optimizer(self, path: Path, grad_ckpt_num: int = 0) -> dict[str, Any]:
        """This rank's optimizer state; ranks map onto rank % N of the N saved files."""
        saved = grad_ckpt_num or len(list(path.glob(f"{SAVE_NAME}-*.rank-*.opt")))
        if saved == 0:
            raise CheckpointError(
                f"{path}: no optimizer files (*.rank-<r>.opt); set train.load_grad: false to load weights only"
            )
        file = self._one(path, f"{SAVE_NAME}-*.rank-{self.rank % saved}.opt")
        return torch.load(file, map_location="cpu", weights_only=True)

    def load_data(self, path: Path, rank: int | None = None) -> Any | None:
        """This rank's (or `rank`'s) data position, or None when the checkpoint has none for
        this world size."""
        if self.saved_world_size(path) != self.world_size:
            return None
        file = path / "dataset_ckpt" / f"dataset_{self.rank if rank is None else rank}.data"
        return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None

    def load_trainer(self, path: Path) -> dict[str, Any] | None:
        """Scheduler, step and RNG states (None for a bare FM9G checkpoint without them)."""
        file = path / "trainer_state.pt"
        return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None

    @staticmethod
    def saved_world_size(path: Path) -> int | None:
        try:
            return int(json.loads((path / MARKER).read_text())["world_size"])
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def model_config(path: Path) -> dict[str, Any]:
        """config.json of a checkpoint."""
        return json.loads((path / "config.json").read_text())

    @staticmethod
    def tokenizer_dir(path: Path) -> Path | None:
        """The tokenizer folder saved with a checkpoint, if any."""
        folder = path / "tokenizer"
        return folder if folder.is_dir() else None
