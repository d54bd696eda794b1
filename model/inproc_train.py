"""The trainer under in-process recovery (`supervise.on_node_loss: wait | shrink`).

The same model, optimizer, schedule and data as `train.Trainer`, built once per process;
only the process group is rebuilt, once per *generation* (`generations.Membership`), over
the run's store job.  A peer's death costs the survivors the step in flight: they
discard it on every rank (the commit vote), re-form, and a rank that lacks the state (a
replacement, a promoted spare) receives it from a survivor.

Data slots keep the global batch.  The run has W = nodes x procs_per_node data slots;
slot s is the loader a rank s reads in a run without faults.  A generation of w ranks
gives rank r the slots r, r+w, r+2w, ... < W, so every step trains all W slots' batches
whatever the world size: under `wait` each rank keeps its slot, under `shrink` the
survivors take over the lost ranks' slots (more micro-batches each, the same gradient).
Every rank holds every slot's position (gathered each step before the vote), so a slot
survives the rank that read it.

Gradients are summed with one all-reduce inside the step guard, not by DDP: DDP holds
its process group, which dies with every generation.  Checkpoints are written by the
generation's rank 0 alone (the state is replicated), with one data file per slot, so a
`restart` run reads them like its own.

With `model.fsdp: true` the state is sharded instead (`shard_state.ShardedState`): FSDP2
is applied per generation to a model rebuilt on the meta device, gradients are summed
by FSDP2's reduce-scatter, peers keep host copies of each other's shards, and a
checkpoint is assembled whole on rank 0 at the start of the step after a save step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fm9g.model.attention import set_attention
from fm9g.model.checkpoint import Checkpointer
from fm9g.model.distributed import Dist, use_cuda
from fm9g.model.dragonfly import build_model
from fm9g.model.generation_rules import Keys
from fm9g.model.generations import Generation, Membership, MembershipConfig, RecoveryFailed, SessionClosed, connect
from fm9g.model.metrics import MetricsLogger
from fm9g.model.shard_state import ShardedState
from fm9g.model.train import Outcome, Trainer, fatal_exit, step_figures
from fm9g.rundir import RunDir, protocol
from fm9g.rundir.config import RunConfig, load_resolved
from fm9g.rundir.inproc_events import EventWriter, trainer_uid
from fm9g.rundir.store_endpoint import StoreEndpoint, read_store_endpoint, session_namespace

ENV_LOCAL_RANK = "FM9G_LOCAL_RANK"
ENV_LOCAL_WORLD = "FM9G_LOCAL_WORLD_SIZE"
ENV_FRESH = "FM9G_INPROC_FRESH"  # the agent's word: load the disk checkpoint, do not expect peers
STORE_RETRY_S = 0.5


def membership_config(config: RunConfig, world_size: int, cuda: bool, namespace: str) -> MembershipConfig:
    """The run's recovery numbers from its config."""
    supervise = config.supervise
    hang = supervise.inproc_hang_timeout
    return MembershipConfig(
        policy="shrink" if supervise.on_node_loss == "shrink" else "wait",
        world_size=world_size,
        backend="nccl" if cuda else "gloo",
        namespace=namespace,
        collective_timeout_s=max(60.0, 3 * hang),
        heartbeat_interval_s=min(0.2, hang / 5),
        absent_after_s=min(1.0, hang),
        hang_timeout_s=hang,
        join_timeout_s=supervise.inproc_join_timeout,
    ).validate()


class SlotLoaders:
    """The loaders of the data slots this rank trains in its current generation."""

    def __init__(self, trainer: Trainer, total: int) -> None:
        self.trainer, self.total = trainer, total
        self.loaders: dict[int, Any] = {}
        self.iterators: dict[int, Any] = {}

    def assign(self, slots: list[int], states: dict[int, Any]) -> None:
        """Read `slots` from their committed positions (`states`; a missing one starts afresh)."""
        self.close()
        for slot in slots:
            loader = self.trainer.build_loader(slot, self.total)
            if states.get(slot) is not None:
                loader.load_state_dict(states[slot])
            self.loaders[slot] = loader
            self.iterators[slot] = iter(loader)

    def next_batches(self, count: int) -> dict[int, list[dict[str, Any]] | None]:
        out: dict[int, list[dict[str, Any]] | None] = {}
        for slot, iterator in self.iterators.items():
            try:
                out[slot] = [next(iterator) for _ in range(count)]
            except StopIteration:
                out[slot] = None
        return out

    def states(self) -> dict[int, Any]:
        return {slot: loader.state_dict() for slot, loader in self.loaders.items()}

    def close(self) -> None:
        for loader in self.loaders.values():
            close = getattr(loader, "close", None)
            if callable(close):
                close()
        self.loaders, self.iterators = {}, {}


class InprocTrainer(Trainer):
    """One rank's trainer whose process group comes and goes with its generations."""

    def __init__(self, run: RunDir, config: RunConfig, ctx: Dist, node_rank: int, events: EventWriter) -> None:
        self.total_slots = config.cluster.nodes * ctx.local_world_size
        super().__init__(run, config, ctx)
        self.node_rank = node_rank
        self.events = events
        self.slots = SlotLoaders(self, self.total_slots)
        self.slot_states: dict[int, Any] = {}
        # One process writes the whole (replicated) checkpoint: no barrier, no gather.
        self.checkpointer = Checkpointer(
            run.checkpoints, 0, self.total_slots, lambda: None, keep_last=self.cfg.keep_checkpoints
        )
        self.gen: Generation | None = None
        self.membership: Membership | None = None
        self.shards: ShardedState | None = None
        if config.model.fsdp:
            self.shards = ShardedState(self, ctx.local_world_size, config.supervise.snapshot_every)
            # The whole model is held (and loaded) unsharded until the first generation shards it.
            self.backend.fsdp = False  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ set-up
    def _build_loader(self) -> Any:
        return None  # the slot loaders are built per generation (SlotLoaders)

    def _load_data(self, source: Path) -> None:
        for slot in range(self.total_slots):
            self.slot_states[slot] = self.checkpointer.load_data(source, rank=slot)
        if any(state is None for state in self.slot_states.values()):
            self.notes.append(f"no data position for {self.total_slots} slots in the checkpoint: data starts afresh")
            self.slot_states = {}

    def load_as_replacement(self) -> None:
        """A replacement's start: no disk read, the state comes from a peer at the first formation."""
        saved = self.cfg.resume_ckpt
        self.cfg = self.cfg.model_copy(update={"resume_ckpt": "none"})
        try:
            self.load()
        finally:
            self.cfg = self.cfg.model_copy(update={"resume_ckpt": saved})
        self.progress.origin = saved.strip()
        if self.shards is not None:
            self.shards.whole = False  # its freshly built weights are nobody's state

    # ------------------------------------------------------------------ PeerState
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": self.progress.state_dict(),
            "slots": {str(slot): state for slot, state in self.slot_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.backend.load_optimizer_state(state["optimizer"])
        # Only a rank that lacks state receives one: it has saved nothing of it.
        self.load_small_state({**state, "saved_step": state["progress"]["step"]})

    # ------------------------------------------------------------------ ShardedState's side
    def build_sharded_model(self) -> torch.nn.Module:
        """A fresh model sharded by FSDP2 over this generation's group: built on the meta
        device, only its shards allocated (uninitialised; `ShardedState.regroup` fills them)."""
        from torch.distributed.fsdp import FSDPModule

        model = build_model(self.args, "meta")
        model.encoder.checkpoint_layers = self.cfg.use_checkpoint
        set_attention(model, self.raw_model.attention_kernel)
        self.backend.shard(model)  # type: ignore[attr-defined]
        model.to_empty(device=self.ctx.device)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum over ranks, as the replicated path's all-reduce does (the loss is already
                # divided by the global micro-batch count); force plain SUM, which gloo has.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    def install_sharded(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Train `model` from here on, with a new optimizer the scheduler drives."""
        self.raw_model = self.model = model
        self.backend.model = model  # type: ignore[attr-defined]
        self.backend.fsdp = True  # type: ignore[attr-defined]
        self.optimizer = self.backend.build_optimizer(
            lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, scale_width=self.args.scale_width
        )
        self.scheduler.optimizer = self.optimizer
        return self.optimizer

    def load_small_state(self, small: dict[str, Any]) -> None:
        """The replicated part of a restored state: schedule, progress, slot positions and
        the step on disk (replicated state: received only by a rank that held none)."""
        had_state = self.shards is not None and (self.shards.whole or self.shards.layout is not None)
        self.scheduler.load_state_dict(small["scheduler"])  # also sets the new optimizer's lr
        self.progress.load_state_dict(small["progress"])
        self.slot_states = {int(slot): value for slot, value in small["slots"].items()}
        if not had_state:  # a replacement: its first step is the restored one's next
            self.start_step = self.progress.step
        self.saved_step = small["saved_step"]

    # ------------------------------------------------------------------ generations
    def enter(self, generation: Generation) -> None:
        """Take this generation's rank: its data slots, and the logger on rank 0."""
        if self.gen is not None and self.gen.number == generation.number:
            return
        self.gen = generation
        self.generation = generation.number
        self.ctx = dataclasses.replace(self.ctx, rank=generation.rank, world_size=generation.world_size)
        # The backend wrapped the model alone (no DDP); from here it only asks whether this
        # rank is the one that copies the replicated weights out for a checkpoint.
        self.backend.ctx = self.ctx  # type: ignore[attr-defined]
        mine = list(range(generation.rank, self.total_slots, generation.world_size))
        self.slots.assign(mine, self.slot_states)
        if (generation.rank == 0) != self.logger.enabled:  # rank 0 of each generation logs, nobody else
            self.logger.close()
            self.logger = MetricsLogger(self.run.metrics, self.tensorboard_dir, enabled=generation.rank == 0)
        self.events(
            "batch",
            {
                "gen": generation.number,
                "world_size": generation.world_size,
                "slots": mine,
                "global_batch": self.total_slots * self.cfg.grad_accum * self.cfg.batch_size,
            },
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> Outcome:
        assert self.membership is not None
        cfg = self.cfg
        self.open_session()
        session_steps = 0
        while not (cfg.stop_when_end and self.progress.step >= cfg.train_iters):
            started = time.perf_counter()
            limit = bool(cfg.max_session_steps) and session_steps >= cfg.max_session_steps
            whole: dict[str, Any] | None = None
            with self.membership.step() as guard:
                self.enter(guard.generation)
                whole = self.upkeep(guard)
                stats, control = self.step(guard, limit)
            if guard.discarded is not None:
                continue
            if self.shards is not None:
                self.shards.exchange(self.membership.watch)
            if whole is not None:
                self.save_whole(whole)
            ended, checkpoint_now, session_limit = control
            if ended:
                break
            elapsed = time.perf_counter() - started
            self.checkpointer.finish()
            if cfg.save and self.shards is None and self.ctx.rank == 0 and self.progress.step % cfg.save_iters == 0:
                self.save()
            self._report(stats, elapsed)
            self._heartbeat()
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
            session_steps += 1
            if checkpoint_now:
                return self._stop("checkpoint_now")
            if session_limit:
                return self._stop("session_limit")
        self.save_last()
        self.checkpointer.finish()
        return "done"

    def upkeep(self, guard: Any) -> dict[str, Any] | None:
        """Sharded state, at the start of a step: the whole state for rank 0 to save when
        the last step was a save step (a collective, so inside the guard)."""
        if self.shards is None:
            return None
        step = self.progress.step
        if self.cfg.save and step and step % self.cfg.save_iters == 0 and self.saved_step != step:
            return self.shards.gather_whole(guard)
        return None

    def save_last(self, force: bool = False) -> None:
        """The checkpoint of the last step, unless it is on disk already (or train.save is
        off and nothing `force`s it: a stop before the end always checkpoints)."""
        if not (self.cfg.save or force) or self.saved_step == self.progress.step:
            return
        if self.shards is None:
            if self.ctx.rank == 0:
                self.save(blocking=True)
            return
        assert self.membership is not None
        while self.saved_step != self.progress.step:  # a collective: retried after a loss
            with self.membership.step() as guard:
                self.enter(guard.generation)
                whole = self.shards.gather_whole(guard)
                guard.commit()
            if guard.discarded is None:
                self.save_whole(whole, blocking=True)

    def step(self, guard: Any, limit: bool) -> tuple[dict[str, Any], tuple[bool, bool, bool]]:
        """One step inside the guard: the stop flags, forward/backward over this rank's
        slots, the summed gradients and figures, every slot's position, the vote, then the
        update.  The flags go first: under FSDP2 a rank that skipped its backward would
        leave its peers' reduce-scatters waiting."""
        per_slot = self.slots.next_batches(self.cfg.grad_accum)
        self.publish_slots(guard)
        ended = any(batches is None for batches in per_slot.values())
        flags = torch.tensor([float(ended), float(self.run.checkpoint_now_flag.exists()), float(limit)])
        control = tuple(bool(flag > 0) for flag in guard.all_reduce(flags.double()).tolist())
        if control[0]:  # some rank's data ended: nobody applies anything
            guard.commit()
            return {}, control  # type: ignore[return-value]
        self.model.train()
        self.backend.zero_grad()
        batches = [batch for slot in sorted(per_slot) for batch in per_slot[slot] or []]
        divisor = self.cfg.grad_accum * self.total_slots
        if self.shards is not None:
            # Every rank runs as many micro-batches as the rank with the most slots (FSDP2's
            # all-gathers pair up across ranks); the extra ones repeat a batch at weight 0.
            most = -(-self.total_slots // guard.generation.world_size) * self.cfg.grad_accum
            pad = most - len(batches)
            sums = self.forward_backward(batches + batches[:pad], divisor=divisor, pad=pad)
        else:
            sums = self.forward_backward(batches, divisor=divisor)
            self.all_reduce_gradients(guard)
        figures = guard.all_reduce(sums)
        gathered = self.gather_slots(guard)
        grad_norm = self.backend.clip_grad_norm(self.cfg.clip_grad)
        guard.commit()
        lr = self.scheduler.current_lr
        self.backend.step()
        self.scheduler.step()
        self.progress.step += 1
        self.slot_states.update(gathered)
        stats = step_figures(figures, self.slot_task_names(), 1, lr, grad_norm)
        self.progress.tokens_passed += stats["tokens"]
        for task, count in stats["task_tokens"].items():
            self.progress.task_tokens[task] = self.progress.task_tokens.get(task, 0) + count
        return stats, control  # type: ignore[return-value]

    def all_reduce_gradients(self, guard: Any) -> None:
        """Replicated state: sum every gradient over the generation with one all-reduce."""
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = guard.all_reduce(torch.cat([g.flatten() for g in grads]))
        offset = 0
        for p in params:
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).clone()
            offset += size

    # Slot positions travel through the store, not a gloo gather: a gather cannot be
    # watched and abandoned like the guard's all-reduce.  Each rank writes its slots'
    # positions before the step's all-reduce; once that completed, every rank has written.
    def _slots_key(self, guard: Any, rank: int, seq: int | None = None) -> str:
        return f"slots/{guard.generation.number}/{guard.seq if seq is None else seq}/{rank}"

    def publish_slots(self, guard: Any) -> None:
        assert self.membership is not None
        states = {str(slot): state for slot, state in self.slots.states().items()}
        self.membership.store.set(self._slots_key(guard, guard.generation.rank), json.dumps(states))

    def gather_slots(self, guard: Any) -> dict[int, Any]:
        assert self.membership is not None
        store, generation = self.membership.store, guard.generation
        raw = store.multi_get([self._slots_key(guard, rank) for rank in range(generation.world_size)])
        if guard.seq > 1:  # every rank read step seq-1's positions before this step's all-reduce
            store.delete_key(self._slots_key(guard, generation.rank, guard.seq - 1))
        return {int(slot): state for blob in raw for slot, state in json.loads(blob).items()}

    def slot_task_names(self) -> list[str]:
        loader = next(iter(self.slots.loaders.values()))
        return list(loader.task_names)

    def report_extra(self) -> dict[str, Any]:
        """The effective batch of every step: this generation's ranks and the slots' batch."""
        return {"world_size": self.ctx.world_size, "global_batch": self.global_batch}

    @property
    def global_batch(self) -> int:
        return self.total_slots * self.cfg.grad_accum * self.cfg.batch_size

    def save(self, blocking: bool | None = None) -> None:
        """Replicated state, not collective: this rank writes every file, one data file per slot."""
        self.write_checkpoint(
            self.progress.state_dict(),
            self.backend.model_state(),
            self.backend.optimizer_state(),
            {"scheduler": self.scheduler.state_dict(), "slots": self.slot_states},
            {"backend": self.backend.name, "world_size": self.total_slots},
            blocking,
        )

    def save_whole(self, whole: dict[str, Any], blocking: bool | None = None) -> None:
        """Sharded state, after `ShardedState.gather_whole` committed: rank 0 writes the
        whole tensors, which any torch layout and world size can load."""
        small = whole["small"]
        if self.ctx.rank == 0:
            slots = {int(slot): state for slot, state in small["slots"].items()}
            self.write_checkpoint(
                small["progress"],
                whole["model"],
                whole["optimizer"],
                {"scheduler": small["scheduler"], "slots": slots},
                {"backend": self.backend.name, "world_size": self.total_slots, "whole": True},
                blocking,
            )
        self.saved_step = small["progress"]["step"]

    def write_checkpoint(
        self,
        progress: dict[str, Any],
        model: dict[str, torch.Tensor],
        optimizer: dict[str, Any] | None,
        replicated: dict[str, Any],
        layout: dict[str, Any],
        blocking: bool | None,
    ) -> None:
        step = progress["step"]
        self.checkpointer.save(
            step,
            model=model,
            optimizer=optimizer,
            data=None,
            data_by_rank=dict(replicated["slots"]),
            trainer={
                "progress": progress,
                "scheduler": replicated["scheduler"],
                "rng": [],
                "world_size": self.total_slots,
                "optimizer_layout": layout,
            },
            log={
                "iteration": step,
                "global_token_pass": progress["tokens_passed"],
                "global_total_task_token": progress["task_tokens"],
            },
            config=self.args.to_json(),
            tokenizer=self.tokenizer,
            blocking=not self.cfg.async_save if blocking is None else blocking,
        )
        self.saved_step = step

    def _stop(self, outcome: Outcome) -> Outcome:
        self.save_last(force=True)
        self.checkpointer.finish()
        self.logger.say(f"{outcome}: checkpointed at step {self.progress.step}; exiting without DONE")
        return outcome

    def await_rank0(self, outcome: Outcome, timeout_s: float = 120.0) -> None:
        """The other ranks leave when rank 0 has written what ends the session (DONE, or
        the checkpoint of this step), so that no node agent reads an unfinished run as a
        stop short of the end.  Rank 0 may sit on another node, still saving."""
        if self.ctx.rank == 0:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if outcome == "done" and self.run.done_flag.exists():
                return
            if outcome != "done" and (self.run.latest_step() or 0) >= self.progress.step:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.slots.close()
        if self.membership is not None:
            self.membership.close()
        super().close()


# ---------------------------------------------------------------------- process entry


def wait_for_store(run: RunDir, timeout_s: float) -> tuple[StoreEndpoint, dist.TCPStore]:
    """The run's store job and a client of it; retried while the job (re)starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        endpoint = read_store_endpoint(run.store_endpoint)
        if endpoint is not None:
            try:
                return endpoint, connect(endpoint.host, endpoint.port, timeout_s=5.0)
            except (dist.DistError, RuntimeError):
                pass  # a store that just died, or not listening yet
        if time.monotonic() > deadline:
            raise RecoveryFailed(
                f"no reachable store in {run.store_endpoint} within {timeout_s:.0f}s "
                "(supervise.inproc_join_timeout): see the store job's log under logs/train/"
            )
        time.sleep(STORE_RETRY_S)


def run_inproc(run_dir: str | Path) -> int:
    """One trainer process under in-process recovery; returns its exit code."""
    run = RunDir.of(run_dir)
    config = load_resolved(run.config)
    node_rank = int(os.environ.get(protocol.ENV_NODE_RANK, "0"))
    local_rank = int(os.environ.get(ENV_LOCAL_RANK, "0"))
    local_world = int(os.environ.get(ENV_LOCAL_WORLD, "1"))
    uid = trainer_uid(node_rank, local_rank, os.getpid())
    events = EventWriter(run.inproc_events, uid, node_rank=node_rank, local_rank=local_rank)
    cuda = use_cuda()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    world = config.cluster.nodes * local_world
    trainer: InprocTrainer | None = None
    try:
        endpoint, probe = wait_for_store(run, config.supervise.inproc_join_timeout)
        namespace = session_namespace(run.name, os.environ.get(protocol.ENV_GENERATION, "0"))
        # A group formed in this store before: this process replaces a lost rank (or is a
        # spare) and gets its state from a peer instead of reading the disk.
        scoped = dist.PrefixStore(namespace + "/", probe)  # as Membership scopes its keys
        live = scoped.check([Keys.decision(0)]) and os.environ.get(ENV_FRESH) != "1"
        del scoped, probe
        ctx = Dist(
            rank=node_rank * local_world + local_rank,
            world_size=1,
            local_rank=local_rank,
            local_world_size=local_world,
            device=device,
            owns_group=False,
        )
        trainer = InprocTrainer(run, config, ctx, node_rank, events)
        if live:
            trainer.load_as_replacement()
        else:
            trainer.load()
        trainer.membership = Membership(
            endpoint.host,
            endpoint.port,
            uid,
            membership_config(config, world, cuda, namespace),
            trainer,
            applied=None if live else trainer.progress.step,
            device=device,
            on_event=events,
            rank_hint=ctx.rank,
            regroup=trainer.shards.regroup if trainer.shards is not None else None,
        )
        outcome = trainer.train()
        trainer.finish(outcome)
        if trainer.ctx.rank == 0:
            trainer.membership.close_session()  # after DONE and the last checkpoint: spares leave now
        trainer.await_rank0(outcome)
        return protocol.EXIT_OK
    except SessionClosed as exc:
        events("session_closed", {"reason": str(exc)})
        return protocol.EXIT_OK
    except RecoveryFailed as exc:
        events("recovery_failed", {"reason": str(exc)[:300]})
        print(f"rank {uid}: in-process recovery failed, falling back: {exc}", file=sys.stderr, flush=True)
        return protocol.EXIT_FALLBACK
    except Exception as exc:
        rank = trainer.ctx.rank if trainer else node_rank * local_world + local_rank
        code = fatal_exit(run, exc, rank)
        if code is None:
            raise
        return code
    finally:
        if trainer is not None:
            trainer.close()
        events.close()


def rank_main(run_dir: str, env: dict[str, str]) -> None:
    """A node agent's child (forked from a starter that imported torch): one rank."""
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.exit(run_inproc(run_dir))
