"""The FM9G trainer: `torchrun ... -m fm9g.model.train --run-dir RUN`.

Reads the run's resolved config.yaml, joins the process group (gloo on CPU, nccl on GPU,
or BMTrain's own), builds tokenizer -> model -> data, then runs the torchtitan-shaped loop:
load -> loop (step -> save every save_iters -> log -> check checkpoint-now) -> close.
The loop is the same for every `model.backend`; how the model is sharded and stepped is
the backend's (`backends.py`: torch DDP/FSDP2, bmtrain ZeRO-3).

Contract with the node agent and the supervisor (files under the run directory):
  - heartbeats/node<k>.json every step (local rank 0 of each node),
  - metrics.jsonl + tensorboard/ + a stdout line per step (rank 0),
  - control/checkpoint_now raised -> all ranks agree at the step boundary, checkpoint,
    exit 0 without DONE (the agent then exits with its "continue" code),
  - finished -> final checkpoint, summary.json, then control/DONE (rank 0),
  - a config or data error -> control/fatal.json and exit EXIT_CONFIG (no retry helps),
  - a full disk (ENOSPC/EDQUOT: a checkpoint, metrics, a heartbeat) -> control/fatal.json
    naming the filesystem and its free space, and exit EXIT_NO_SPACE (no retry helps
    until someone frees space; then `fm9g-launch resume RUN` continues).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fm9g.model.args import ModelArgs, ModelConfigError, load_model_config
from fm9g.model.attention import select_attention, set_attention
from fm9g.model.backends import BackendError, init_process_group, make_backend
from fm9g.model.checkpoint import Checkpointer, CheckpointError, discard_partial
from fm9g.model.distributed import DeviceError, Dist
from fm9g.model.dragonfly import build_model, count_parameters
from fm9g.model.flops import peak_flops, step_flops
from fm9g.model.metrics import MetricsLogger, write_heartbeat
from fm9g.model.progress import Progress, rng_state, seed_everything, set_rng_state
from fm9g.model.schedules import build_scheduler
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.atomic import is_no_space, mount_point, no_space_reason, read_json, write_json
from fm9g.rundir.config import ConfigError, RunConfig, load_resolved

Outcome = Literal["done", "checkpoint_now", "session_limit"]


class TrainerConfigError(ValueError):
    """A setting the trainer cannot honour here; the message says what to change."""


def _data_error() -> type[Exception]:
    try:
        from fm9g.data.errors import DataError

        return DataError
    except ImportError:  # the data layer is optional for importing this module
        return TrainerConfigError


class Trainer:
    """One training session of one rank; every method with collectives is called on all ranks."""

    def __init__(self, run: RunDir, config: RunConfig, ctx: Dist) -> None:
        self.run, self.config, self.cfg, self.ctx = run, config, config.train, ctx
        self.generation = int(os.environ.get(protocol.ENV_GENERATION, "0"))
        self.node_rank = int(os.environ.get(protocol.ENV_NODE_RANK) or os.environ.get("GROUP_RANK") or 0)
        self.notes: list[str] = []
        self._check_supported()
        seed_everything(self.cfg.seed + ctx.rank)  # dropout/data randomness differs per rank
        self.tokenizer = self._load_tokenizer()
        self.args = self._model_args()
        self.tensorboard_dir = run.tensorboard / f"{self.cfg.exp_group}{run.name}"
        self.logger = MetricsLogger(run.metrics, self.tensorboard_dir, enabled=ctx.is_main)
        model = build_model(self.args, ctx.device, seed=self.cfg.seed)
        model.encoder.checkpoint_layers = self.cfg.use_checkpoint
        self.bf16 = config.model.dtype == "bf16" or (config.model.dtype == "auto" and ctx.device.type == "cuda")
        try:
            kernel = select_attention(
                self.cfg.flash, ctx.device, half=self.bf16, deterministic=self.cfg.deterministic, notes=self.notes
            )
            set_attention(model, kernel)
        except RuntimeError as exc:
            raise TrainerConfigError(str(exc)) from None
        self.raw_model = model
        self.model: torch.nn.Module = model
        self.param_count = count_parameters(model)  # before a backend shards the parameters
        self.backend = make_backend(
            config.model.backend,
            ctx,
            fsdp=config.model.fsdp,
            bf16=self.bf16,
            use_checkpoint=self.cfg.use_checkpoint,
            offload=config.model.offload,
        )
        self.checkpointer = Checkpointer(
            run.checkpoints, ctx.rank, ctx.world_size, ctx.barrier, keep_last=self.cfg.keep_checkpoints
        )
        self.progress = Progress()
        self.updating = False  # True while the optimizer changes parameters (an OOM there cannot be skipped)
        self.loader = self._build_loader()  # this rank's share of the data
        self.peak, peak_note = peak_flops(ctx.device, self.cfg.peak_tflops)
        self.notes.append(peak_note)
        if ctx.device.type == "cuda":
            self._check_memory(config)

    # ------------------------------------------------------------------ set-up
    def _check_memory(self, config: RunConfig) -> None:
        """Refuse a layout whose weights, gradients and Adam states alone exceed the GPU (8B on DDP)."""
        from fm9g.model.memory import check_fits, layout_of

        offload = self.bf16 and config.model.offload is not False
        problem, note = check_fits(
            self.args,
            layout_of(config.model.backend, config.model.fsdp, offload),
            gpus=self.ctx.world_size,
            tokens=self.cfg.batch_size * config.data.max_length,
            checkpoint=self.cfg.use_checkpoint,
            device_bytes=torch.cuda.get_device_properties(self.ctx.device).total_memory,
        )
        if problem is not None:
            raise TrainerConfigError(problem)
        self.notes.append(note)

    def _check_supported(self) -> None:
        if self.ctx.device.type == "cpu":
            if self.cfg.ignore_cuda_oom:
                self.notes.append("ignore_cuda_oom has no effect on CPU")
            if self.cfg.flash == "auto":
                self.notes.append("flash=auto: torch SDPA with block-diagonal masks on CPU")
        self.notes.append(
            "local, dataloader=indexed, model_unique: informational here (the run directory is chosen by the orchestrator)"
        )

    def _load_tokenizer(self) -> Any:
        from fm9g.data.tokenizer import load_tokenizer

        path = Path(self.config.data.tokenizer_path or self.run.tokenizer_dir / "tokenizer.model")
        if not path.exists():
            raise TrainerConfigError(
                f"tokenizer {path} does not exist: set data.tokenizer_path, or let the "
                "orchestrator train one into the run directory before training"
            )
        return load_tokenizer(path)

    def _model_args(self) -> ModelArgs:
        name = self.config.model.config
        overrides: dict[str, Any] = {}
        if self.cfg.eps is not None:
            overrides["eps"] = self.cfg.eps
        if name == "tiny":
            overrides["vocab_size"] = self.tokenizer.vocab_size  # the tiny model is sized to its tokenizer
        args = load_model_config(name, **overrides)
        if self.tokenizer.vocab_size > args.vocab_size:
            raise TrainerConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model config {name!r} "
                f"only {args.vocab_size}: use a matching tokenizer or model config"
            )
        return args

    def _build_loader(self) -> Any:
        return self.build_loader(self.ctx.rank, self.ctx.world_size)

    def build_loader(self, rank: int, world_size: int) -> Any:
        """The loader of data share `rank` of `world_size` (the strided split every rank reads)."""
        from fm9g.data.loader import PackedLoader
        from fm9g.data.mixture import load_mixture

        data = self.config.data
        if not data.dataset_config:
            raise TrainerConfigError("data.dataset_config is not set: point it at a mixture JSON list")
        # The run's resolved mixture (raw datasets replaced by their indexes) when the
        # launcher wrote one; the config's own mixture when the trainer runs by hand.
        path = self.run.mixture if self.run.mixture.exists() else Path(data.dataset_config)
        mixture = load_mixture(path, path.parent)
        return PackedLoader(
            mixture,
            self.tokenizer,
            batch_size=self.cfg.batch_size,
            max_length=data.max_length,
            rank=rank,
            world_size=world_size,
            seed=self.cfg.seed,
            sft=data.sft,
            oversize_rule=data.oversize_rule,
            num_workers=data.dataloader_num_workers,
            prefetch_factor=data.dataloader_prefetch_factor,
            num_threads=data.dataloader_num_threads,
            prefetch=data.dataloader_prefetch,
            on_error="fail",
            fail_hint=(
                "or leave the task out by setting its abs_weight (or weight) to 0 in "
                f"{path}; then `fm9g-launch resume {self.run.name}` continues from the "
                "last checkpoint"
            ),
        )

    # ------------------------------------------------------------------ load
    def _resume_source(self) -> tuple[Path | None, bool]:
        """(checkpoint to load, full resume?). A restart never goes back past this line's latest."""
        spec = self.cfg.resume_ckpt.strip()
        if spec.lower() == "none":
            return None, False
        latest = self.checkpointer.latest()
        if latest is not None:
            state = self.checkpointer.load_trainer(latest) or {}
            if spec == "" or state.get("progress", {}).get("origin") == spec:
                return latest, True
        if spec == "":
            return None, False
        return self.checkpointer.resolve(spec), not self.cfg.only_load_model

    def load(self) -> None:
        """Resume (weights, optimizer, schedule position, data position, RNG) and wrap the model."""
        source, full = self._resume_source()
        if source is not None:
            state = self.checkpointer.load_model(source)
            missing, unexpected = self.raw_model.load_state_dict(state, strict=self.cfg.strict_state_dict)
            if missing or unexpected:
                self.notes.append(f"non-strict load: missing {missing}, unexpected {unexpected}")
        self.model = self.backend.wrap(self.raw_model)
        self.optimizer = self.backend.build_optimizer(
            lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, scale_width=self.args.scale_width
        )
        if source is not None and full:
            trainer_state = self.checkpointer.load_trainer(source) or {}
            if "progress" in trainer_state:
                self.progress.load_state_dict(trainer_state["progress"])
            else:  # a bare FM9G checkpoint: the step from its .log_ckpt
                self.progress.step = self.checkpointer.step_of(source)
            if self.cfg.load_grad:
                self._check_optimizer_layout(source, trainer_state.get("optimizer_layout"))
                self._load_optimizer(self.checkpointer.load_optimizer(source, self.cfg.grad_ckpt_num))
            rngs = trainer_state.get("rng") or []
            if len(rngs) == self.ctx.world_size:
                set_rng_state(rngs[self.ctx.rank])
            if self.cfg.load_dataloader_ckpt:
                self._load_data(source)
        self.progress.origin = self.cfg.resume_ckpt.strip()  # checkpoints from here on belong to this line
        self.start_step = self.progress.step
        self.session_started = time.time()
        self.first_step_at: float | None = None  # when this process finished its first step
        self.scheduler = build_scheduler(
            self.optimizer,
            self.cfg.lr_scheduler,
            lr=self.cfg.lr,
            train_iters=self.cfg.train_iters,
            warmup_iters=self.cfg.warmup_iters,
            drop_iters=self.cfg.drop_iters,
            drop_begin=self.cfg.drop_begin,
            drop_rate=self.cfg.drop_rate,
            start_step=self.start_step,
            resume_no_optimze=self.cfg.resume_no_optimze if source is not None else 0,
        )
        how = "fresh start" if source is None else f"{'resumed' if full else 'weights only'} from {source}"
        self.logger.say(f"world_size={self.ctx.world_size} device={self.ctx.device} step={self.start_step} ({how})")
        self.logger.say(
            f"model {self.config.model.config}: {self.param_count:,} parameters, "
            f"attention {type(self.raw_model.attention_kernel).__name__}, bf16={self.bf16}, "
            f"backend {self.backend.name}"
        )
        for note in self.notes:
            self.logger.say(f"note: {note}")

    def _load_data(self, source: Path) -> None:
        data_state = self.checkpointer.load_data(source)
        if data_state is None:
            self.notes.append("no data position for this world size in the checkpoint: data starts afresh")
        else:
            self.loader.load_state_dict(data_state)

    def _check_optimizer_layout(self, source: Path, saved: dict[str, Any] | None) -> None:
        """Refuse optimizer files this backend and world size cannot use, before they fail obscurely.

        Whole tensors (DDP's replicated state, or an in-process run's, marked `whole`) fit any
        torch layout at any world size: FSDP2 cuts its rows on load (`backends.local_rows`).
        Sharded states (FSDP2, bmtrain) only fit the backend and world size that wrote them.
        """
        if saved is None:  # a checkpoint from before the layout was recorded, or a bare FM9G one
            return
        if saved.get("whole") or saved["backend"] == "torch-ddp":
            if self.backend.name.startswith("torch"):  # whole tensors: any torch layout cuts its own rows
                return
        here = {"backend": self.backend.name, "world_size": self.ctx.world_size}
        if saved["backend"] == here["backend"] and saved["world_size"] == here["world_size"]:
            return
        raise CheckpointError(
            f"{source}: its optimizer state was written by {saved['backend']} with {saved['world_size']} ranks and "
            f"cannot be loaded by {here['backend']} with {here['world_size']}; resume with the same backend and "
            "world size, or set train.load_grad: false to keep the weights, schedule and data position and "
            "restart the Adam moments"
        )

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        # load_state_dict also restores each group's lr (the *scheduled* lr at save time) and
        # weight decay; the schedule needs the configured base lrs, so put the config back.
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.backend.load_optimizer_state(state)
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)

    # ------------------------------------------------------------------ the step
    def _next_batches(self, data: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        try:
            return [next(data) for _ in range(self.cfg.grad_accum)]
        except StopIteration:
            return None

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Forward/backward over the micro-batches, clip, optimizer and schedule step; global figures."""
        self.model.train()
        self.backend.zero_grad()
        names = list(batches[0]["task_names"])
        sums = self.forward_backward(batches, divisor=len(batches))
        grad_norm = self.backend.clip_grad_norm(self.cfg.clip_grad)
        if self.cfg.inspect_iters and (self.progress.step + 1) % self.cfg.inspect_iters == 0:
            self._inspect(self.progress.step + 1)
        lr = self.scheduler.current_lr  # the lr this update uses
        self.updating = True  # from here an OOM cannot be skipped: parameters change in place
        self.backend.step()
        self.scheduler.step()
        return step_figures(self.ctx.all_reduce(sums), names, self.ctx.world_size, lr, grad_norm)

    def forward_backward(self, batches: list[dict[str, Any]], divisor: int, pad: int = 0) -> torch.Tensor:
        """Forward and backward of each micro-batch, its mean loss divided by `divisor`; the
        step's sums (loss, tokens, flops, per-task loss sums, counts and tokens), not reduced.
        The last `pad` batches only keep collectives paired: weight 0, left out of the sums."""
        names = list(batches[0]["task_names"])
        n = len(names)
        sums = torch.zeros(3 * n + 3, dtype=torch.float64)
        device = self.ctx.device
        for index, batch in enumerate(batches):
            ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
            with self.backend.accumulation(index == len(batches) - 1), autocast:
                logits = self.model(
                    ids,
                    batch["position_ids"].to(device),
                    batch["segment_ids"].to(device),
                    batch["cu_seqlens"].to(device),
                    int(batch["max_seqlen"]),
                )
                per_token = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
                )  # targets come pre-shifted
                trained = targets.flatten() != -100
                loss = per_token.sum() / trained.sum().clamp(min=1)
                padding = index >= len(batches) - pad
                self.backend.backward(loss * 0.0 if padding else loss / divisor)
            if padding:
                continue
            tasks = batch["task_ids"].to(device).flatten().long()
            sums[0] += float(loss.detach()) / divisor
            sums[1] += int(batch["num_tokens"])
            sums[2] += step_flops(self.args, ids.numel(), batch["cu_seqlens"])
            sums[3 : 3 + n] += (
                torch.zeros(n, dtype=torch.float64, device=device)
                .index_add_(0, tasks[trained], per_token.detach()[trained].double())
                .cpu()
            )
            sums[3 + n : 3 + 2 * n] += torch.bincount(tasks[trained], minlength=n)[:n].double().cpu()
            sums[3 + 2 * n :] += torch.bincount(tasks[tasks >= 0], minlength=n)[:n].double().cpu()
        return sums

    def _guarded_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """train_step, skipping a batch that runs out of GPU memory when train.ignore_cuda_oom allows it."""
        self.updating = False
        try:
            return self.train_step(batches)
        except torch.OutOfMemoryError:
            if not (self.cfg.ignore_cuda_oom and self.ctx.device.type == "cuda"):
                raise
            if self.ctx.world_size > 1 or not self.backend.can_skip_a_batch or self.updating:
                # Other ranks already wait in the gradient all-reduce (a one-sided skip would hang them),
                # a ZeRO-3 block or FSDP2 unit that ran out of memory half-way cannot be unwound, and an
                # optimizer step that failed part-way has updated some parameters and not others.
                raise RuntimeError(
                    f"CUDA out of memory on rank {self.ctx.rank}: ignore_cuda_oom can only skip a batch "
                    f"before the optimizer step, with the torch backend's unwrapped model on one rank (here "
                    f"{self.backend.name}, world_size {self.ctx.world_size}"
                    f"{', in the optimizer step' if self.updating else ''}); exiting so torchrun restarts "
                    "from the last checkpoint (lower data.max_length or train.batch_size)"
                ) from None
        # Cleanup outside the except block: inside it the traceback still holds the failed step's
        # activations, and empty_cache() could free none of them.
        self.backend.zero_grad()
        torch.cuda.empty_cache()
        self.scheduler.step()  # the step still counts, so the schedule stays aligned with it
        self.logger.say(f"step {self.progress.step + 1}: CUDA out of memory, batch skipped (train.ignore_cuda_oom)")
        return {"tokens": 0, "flops": 0.0, "task_tokens": {}}

    def _inspect(self, step: int) -> None:
        stats = {}
        for name, param in self.raw_model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: this rank's shard
            entry = {
                "std": float(local.detach().float().std()) if local.numel() > 1 else 0.0,
                "max": float(local.detach().abs().max()) if local.numel() else 0.0,
            }
            if param.grad is not None:
                grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
                entry["grad_std"] = float(grad.float().std()) if grad.numel() > 1 else 0.0
            stats[name] = entry
        self.logger.log_inspect(step, stats)

    def data_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """train.only_run_dataloader: count the tokens, no model work."""
        tokens = self.ctx.all_reduce(torch.tensor([float(sum(int(b["num_tokens"]) for b in batches))]))
        return {"tokens": int(tokens[0]), "flops": 0.0, "task_tokens": {}}

    # ------------------------------------------------------------------ the loop
    def train(self) -> Outcome:
        """Run steps until train_iters (or the data's end), checkpoint-now, or the session limit."""
        cfg = self.cfg
        data = iter(self.loader)
        self.open_session()
        session_steps = 0
        while not (cfg.stop_when_end and self.progress.step >= cfg.train_iters):
            started = time.perf_counter()
            batches = self._next_batches(data)
            if self.ctx.any(batches is None):  # every rank stops when any rank's data ends
                break
            stats = self.data_step(batches) if cfg.only_run_dataloader else self._guarded_step(batches)
            elapsed = time.perf_counter() - started
            self.progress.step += 1
            self.progress.tokens_passed += stats["tokens"]
            for task, count in stats.get("task_tokens", {}).items():
                self.progress.task_tokens[task] = self.progress.task_tokens.get(task, 0) + count
            self.checkpointer.finish()  # an async save of an earlier step becomes visible here
            if cfg.save and not cfg.only_run_dataloader and self.progress.step % cfg.save_iters == 0:
                self.save()
            self._report(stats, elapsed)
            self._heartbeat()
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
            session_steps += 1
            if self.ctx.any(self.run.checkpoint_now_flag.exists()):
                return self._stop("checkpoint_now")
            if cfg.max_session_steps and session_steps >= cfg.max_session_steps:
                return self._stop("session_limit")
        if cfg.save and not cfg.only_run_dataloader and self.saved_step != self.progress.step:
            self.save(blocking=True)
        self.checkpointer.finish()
        return "done"

    def open_session(self) -> None:
        """Before the first step of this process: nothing logged or saved yet, a first heartbeat."""
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.saved_step = self.start_step
        self._heartbeat()

    def _stop(self, outcome: Outcome) -> Outcome:
        if not self.cfg.only_run_dataloader and self.saved_step != self.progress.step:
            self.save(blocking=True)  # checkpoint-now saves even with save: false: it is an explicit request
        self.checkpointer.finish()
        self.logger.say(f"{outcome}: checkpointed at step {self.progress.step}; exiting without DONE")
        return outcome

    def save(self, blocking: bool | None = None) -> None:
        """Collective: write a checkpoint of the current step."""
        rngs = self.ctx.gather_objects(rng_state())
        model_state = self.backend.model_state()
        optimizer_state = self.backend.optimizer_state()
        step = self.progress.step
        log = {
            "iteration": step,
            "global_token_pass": self.progress.tokens_passed,
            "global_total_task_token": self.progress.task_tokens,
        }
        self.checkpointer.save(
            step,
            model=model_state,
            optimizer=optimizer_state,
            data=self.loader.state_dict(),
            trainer={
                "progress": self.progress.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "world_size": self.ctx.world_size,
                "optimizer_layout": {"backend": self.backend.name, "world_size": self.ctx.world_size},
            },
            log=log,
            config=self.args.to_json(),
            tokenizer=self.tokenizer,
            blocking=not self.cfg.async_save if blocking is None else blocking,
        )
        self.saved_step = step

    def _report(self, stats: dict[str, Any], elapsed: float) -> None:
        loss = stats.get("loss")
        if loss is not None:
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        if self.progress.step % self.cfg.log_iters:
            return
        record: dict[str, Any] = {
            "step": self.progress.step,
            "generation": self.generation,
            "tokens_per_s": stats["tokens"] / elapsed,
            "tokens": self.progress.tokens_passed,
        }
        record.update(self.report_extra())
        if loss is not None:
            record.update(loss=loss, lr=stats["lr"], grad_norm=stats["grad_norm"])
            record["tflops"] = stats["flops"] / elapsed / self.ctx.world_size / 1e12  # per device
            if self.peak:
                record["mfu"] = record["tflops"] * 1e12 / self.peak
            if self.cfg.tensorboard_all_tasks:
                record["task_loss"] = stats["task_loss"]
        self.logger.log_step(record)

    def report_extra(self) -> dict[str, Any]:
        """Fields a subclass adds to every metrics line."""
        return {}

    def _heartbeat(self) -> None:
        if self.ctx.local_rank == 0:
            if self.first_step_at is None and self.progress.step > self.start_step:
                # Kept apart from the heartbeat's own time, which every later step moves on.
                self.first_step_at = time.time()
            write_heartbeat(
                self.run.heartbeat(self.node_rank),
                self.progress.step,
                self.generation,
                self.session_started,
                self.start_step,
                self.first_step_at,
            )

    # ------------------------------------------------------------------ close
    def finish(self, outcome: Outcome) -> None:
        """Rank 0: summary.json (merged with earlier sessions'), then DONE when training is over."""
        if not self.ctx.is_main:
            return
        latest = self.checkpointer.latest()
        session = {
            "outcome": outcome,
            "steps_run": self.progress.step - self.start_step,
            "start_step": self.start_step,
            "final_step": self.progress.step,
            "train_iters": self.cfg.train_iters,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "tokens_passed": self.progress.tokens_passed,
            "checkpoint": str(latest) if latest else None,
            "tensorboard": str(self.tensorboard_dir),
        }
        write_json(self.run.summary, merge_summary(read_json(self.run.summary), session))
        if outcome == "done":
            write_json(self.run.done_flag, {"step": self.progress.step, "time": time.time()})

    def close(self) -> None:
        self.logger.close()
        close = getattr(self.loader, "close", None)
        if callable(close):
            close()


def step_figures(
    total: torch.Tensor, names: list[str], loss_divisor: int, lr: float, grad_norm: float
) -> dict[str, Any]:
    """A step's global figures from its all-reduced sums (`Trainer.forward_backward`'s layout);
    `loss_divisor` turns the summed mean losses into the step's mean."""
    n = len(names)
    task_counts = total[3 + n : 3 + 2 * n]
    return {
        "loss": float(total[0]) / loss_divisor,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": int(total[1]),
        "flops": float(total[2]),
        "task_loss": {name: float(total[3 + i] / task_counts[i]) for i, name in enumerate(names) if task_counts[i] > 0},
        "task_tokens": {name: int(total[3 + 2 * n + i]) for i, name in enumerate(names)},
    }


def merge_summary(before: Any, session: dict[str, Any]) -> dict[str, Any]:
    """This session's summary merged with the one already on disk from earlier sessions.

    A run resumed after a restart has several trainer sessions; summary.json describes
    the whole run: start_step and first_loss of the earliest session, steps_run summed
    over the sessions that wrote a summary, everything else the latest's."""
    if not isinstance(before, dict) or not isinstance(before.get("start_step"), int):
        return {**session, "sessions": 1}
    if session["start_step"] < int(before.get("final_step") or 0):
        # Started before where the last summary ended (resume_ckpt: none, or an older step):
        # a new line of training, which the earlier sessions' figures do not describe.
        return {**session, "sessions": 1}
    merged = dict(session)
    merged["start_step"] = before["start_step"]
    merged["steps_run"] = session["steps_run"] + int(before.get("steps_run") or 0)
    if before.get("first_loss") is not None:
        merged["first_loss"] = before["first_loss"]
    merged["sessions"] = int(before.get("sessions") or 1) + 1
    return merged


def _no_space_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind `exc`, if any (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if is_no_space(current):
            return current  # type: ignore[return-value]
        current = current.__cause__ or current.__context__
    return None


def _fatal_no_space(run: RunDir, error: OSError, rank: int) -> int:
    """Record a full disk as a fatal failure: retrying before space is freed only fails again."""
    if rank == 0:
        discard_partial(run.checkpoints)  # a half-written checkpoint is never loaded; give its space back
    mount = mount_point(error.filename or run.root)
    reason = "no space left on device: " + no_space_reason(
        error.filename or run.root,
        f"`fm9g-launch resume {run.name}` continues from the last complete checkpoint",
    )
    print(f"fatal (rank {rank}): {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):  # the record itself may not fit; the exit code still says it
        write_json(
            run.fatal_record,
            {
                "reason": reason,
                "rank": rank,
                "time": time.time(),
                "exit_code": protocol.EXIT_NO_SPACE,
                "filesystem": str(mount),
            },
        )
    return protocol.EXIT_NO_SPACE


def _fatal(run: RunDir, exc: BaseException, rank: int) -> int:
    reason = f"{type(exc).__name__}: {exc}"
    print(f"fatal (rank {rank}): {reason}", file=sys.stderr, flush=True)
    write_json(
        run.fatal_record,
        {"reason": reason, "rank": rank, "time": time.time(), "traceback": traceback.format_exc(limit=5)},
    )
    return protocol.EXIT_CONFIG


def run(run_dir: str | Path) -> int:
    """One trainer session over a run directory; returns the process exit code."""
    run_dirs = RunDir.of(run_dir)
    ctx: Dist | None = None
    try:
        config = load_resolved(run_dirs.config)
        if config.supervise.on_node_loss != "restart":
            from fm9g.model.inproc_train import run_inproc

            return run_inproc(run_dirs.root)
        ctx = init_process_group(config.model.backend)
        trainer = Trainer(run_dirs, config, ctx)
        try:
            trainer.load()
            outcome = trainer.train()
            trainer.finish(outcome)
        finally:
            trainer.close()
        return protocol.EXIT_OK
    except Exception as exc:
        code = fatal_exit(run_dirs, exc, ctx.rank if ctx else int(os.environ.get("RANK", "0")))
        if code is None:
            raise
        return code
    finally:
        if ctx is not None:
            ctx.close()


def fatal_exit(run_dirs: RunDir, exc: BaseException, rank: int) -> int | None:
    """Record an error no retry can fix (config, data, checkpoint, a full disk) and return
    its exit code; None for any other error, which the caller re-raises."""
    fatal_types = (
        ConfigError,
        ModelConfigError,
        CheckpointError,
        TrainerConfigError,
        BackendError,
        DeviceError,
        _data_error(),
    )
    full = _no_space_error(exc)
    if full is not None:  # before fatal_types: an async save's ENOSPC arrives as a CheckpointError
        return _fatal_no_space(run_dirs, full, rank)
    if isinstance(exc, fatal_types):
        return _fatal(run_dirs, exc, rank)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm9g.model.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir",
        default=os.environ.get(protocol.ENV_RUN_DIR),
        help=f"the run directory (default: ${protocol.ENV_RUN_DIR})",
    )
    options = parser.parse_args(argv)
    if not options.run_dir:
        parser.error(f"--run-dir is required (or set {protocol.ENV_RUN_DIR})")
    return run(options.run_dir)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with gloo, a rank whose C++ threads were still being
    # torn down at exit occasionally aborted ("terminate called without an active
    # exception", exit -6) after a clean finish, and torchrun reported the whole group
    # failed.  Everything this process writes is closed by now (the trainer's close,
    # the checkpointer's finish); the in-process ranks leave the same way (os._exit in
    # multiprocessing's child).
    os._exit(code)
