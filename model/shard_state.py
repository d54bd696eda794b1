"""A sharded (FSDP2) rank's state across generations: peer snapshots and re-sharding.

Under FSDP2 no rank holds another's parameter or Adam shards, so a lost node takes its
shards with it.  Every `supervise.snapshot_every` steps, right after the commit and the
update, each rank copies its shards to host memory and sends the copy to its buddy, a
rank on the next node (`shard_plan.buddy_of`).  A copy is kept once it has arrived
whole; the state it holds is committed already, so a peer lost mid-transfer costs no
step, only this copy (the group re-forms from the previous one, one snapshot back).

After every re-form (`regroup`, called by the membership on all members) the members
report what they hold, agree on the newest step at which every shard of one layout has
a holder (`shard_plan.plan_restore`), and build a fresh FSDP2 model and optimizer for
the new world size: each tensor is assembled whole, one at a time, from the holders'
rows (one all-reduce), and each rank keeps its own rows of the new layout.  FSDP2
cannot re-shard a module in place, so the module is rebuilt on the meta device and
only its shards are allocated.  Nothing of the old state is dropped before the new one
is complete, so a failed regroup can be retried from the same holdings.

Memory: each rank keeps its live shards, up to two of its own snapshots and two copies
of its ward's, each three tensors (parameter, exp_avg, exp_avg_sq) per parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from fm9g.model.generation_state import broadcast_state
from fm9g.model.generations import Generation, NoLiveState
from fm9g.model.shard_plan import Held, Holdings, Layout, NoShardCopy, buddy_of, chunk_rows, plan_restore, ward_of

if TYPE_CHECKING:
    from fm9g.model.inproc_train import InprocTrainer

KINDS = ("param", "exp_avg", "exp_avg_sq")
KEEP = 2  # snapshots kept per kind: a transfer cut short leaves the previous one usable


@dataclass
class Snapshot:
    """One rank's shards of `layout` after `step` steps, flattened (KINDS per parameter)."""

    layout: Layout
    rank: int
    step: int
    flat: torch.Tensor
    small: dict[str, Any] | None  # schedule, progress, slot positions (own snapshots only)


class ShardedState:
    """Owned by an `InprocTrainer` with `model.fsdp: true`; see the module docstring."""

    def __init__(self, trainer: InprocTrainer, ranks_per_node: int, every: int) -> None:
        self.trainer = trainer
        self.ranks_per_node = ranks_per_node
        self.every = every
        self.shapes = {name: tuple(p.shape) for name, p in trainer.raw_model.named_parameters()}
        self.layout: Layout | None = None  # the live shards' layout; None while the whole state is held
        self.rank = 0
        self.whole = True  # the process holds the unsharded model it loaded (or built) at start
        self.committed = False  # a step committed in the live layout (its shards are new state)
        self.own: list[Snapshot] = []
        self.wards: list[Snapshot] = []

    # ------------------------------------------------------------------ holdings
    def holdings(self) -> Holdings:
        shards: list[Held] = []
        step = self.trainer.progress.step
        if self.layout is not None:
            shards.append(Held(self.layout, self.rank, step, "live"))
        shards += [Held(s.layout, s.rank, s.step, "own") for s in self.own]
        shards += [Held(s.layout, s.rank, s.step, "ward") for s in self.wards]
        return Holdings(tuple(shards), step if self.whole else None)

    def small_state(self) -> dict[str, Any]:
        """The replicated part of the state: the same on every rank after every commit."""
        trainer = self.trainer
        return {
            "scheduler": trainer.scheduler.state_dict(),
            "progress": trainer.progress.state_dict(),
            "slots": {str(slot): state for slot, state in trainer.slot_states.items()},
            "adam_step": self.adam_step(),
            # Which checkpoint is on disk decides a collective (the whole-state gather), so
            # every rank must agree on it: a replacement takes it from here.
            "saved_step": trainer.saved_step,
        }

    def adam_step(self) -> float:
        states = [s for s in self.trainer.optimizer.state.values() if "step" in s]
        return float(states[0]["step"]) if states else 0.0

    # ------------------------------------------------------------------ flat shards
    def row_counts(self, rank: int, world: int) -> dict[str, int]:
        """Rows of each parameter in `rank`'s shard of a `world`-rank layout."""
        counts = {}
        for name, shape in self.shapes.items():
            start, end = chunk_rows(shape[0], world, rank)
            counts[name] = end - start
        return counts

    def flat_numel(self, rank: int, world: int) -> int:
        rows = self.row_counts(rank, world)
        return sum(len(KINDS) * rows[name] * _row_numel(shape) for name, shape in self.shapes.items())

    def pieces(self, flat: torch.Tensor, rank: int, world: int) -> dict[tuple[str, str], torch.Tensor]:
        """Views of a flat snapshot: (parameter, kind) -> its rows."""
        out, offset = {}, 0
        rows = self.row_counts(rank, world)
        for name, shape in self.shapes.items():
            size = rows[name] * _row_numel(shape)
            for kind in KINDS:
                out[(name, kind)] = flat[offset : offset + size].view(rows[name], *shape[1:])
                offset += size
        return out

    def live_pieces(self) -> dict[tuple[str, str], torch.Tensor]:
        """(parameter, kind) -> this rank's live rows (the whole tensor while unsharded)."""
        return live_pieces(self.trainer.raw_model, self.trainer.optimizer)

    def pack_live(self) -> torch.Tensor:
        return pack(self.live_pieces(), list(self.shapes))

    # ------------------------------------------------------------------ snapshots
    def due(self) -> bool:
        """A snapshot is taken at this step and not yet complete (a discarded attempt retries)."""
        step = self.trainer.progress.step
        if self.every <= 0 or self.layout is None or step % self.every:
            return False
        alone = buddy_of(self.rank, self.layout.world, self.ranks_per_node) is None
        return not self._held(self.own if alone else self.wards, self.layout, step)

    def exchange(self, watch: Callable[[dist.Work], bool]) -> None:
        """Right after a commit: keep a host copy of this rank's shards and swap copies with
        the buddy and the ward.  `watch` (Membership.watch) waits for the transfer; a peer
        lost mid-transfer leaves the previous copies in place and the group re-forms."""
        self.committed = True
        if not self.due():
            return
        assert self.layout is not None
        step, world = self.trainer.progress.step, self.layout.world
        flat = self.pack_live()  # a fresh tensor: on the CPU it is the host copy itself
        self._keep(self.own, Snapshot(self.layout, self.rank, step, flat.to("cpu"), self.small_state()))
        buddy = buddy_of(self.rank, world, self.ranks_per_node)
        ward = ward_of(self.rank, world, self.ranks_per_node)
        if buddy is None or ward is None:
            return
        received = torch.empty(self.flat_numel(ward, world), dtype=flat.dtype, device=flat.device)
        try:
            work = send_to_buddy(flat, received, buddy, ward, world)
        except Exception:
            return  # the group is broken: the next step's collective fails and re-forms
        if watch(work):
            self._keep(self.wards, Snapshot(self.layout, ward, step, received.to("cpu"), None))

    def _keep(self, ring: list[Snapshot], snapshot: Snapshot) -> None:
        ring[:] = [s for s in ring if (s.layout, s.step) != (snapshot.layout, snapshot.step)] + [snapshot]
        del ring[:-KEEP]

    def gather_whole(self, guard: Any) -> dict[str, Any]:
        """Inside a step guard: the whole model and optimizer state for a checkpoint (kept
        by rank 0 only; every rank takes part), and the replicated state beside it."""
        assert self.layout is not None
        trainer, keep = self.trainer, self.rank == 0
        live = self.live_pieces()
        adam_step = self.adam_step()
        kinds = KINDS if adam_step > 0 else KINDS[:1]
        whole: dict[tuple[str, str], torch.Tensor] = {}
        for name, shape in self.shapes.items():
            for kind in kinds:
                piece = live[(name, kind)]
                buffer = whole_from_rows(shape, self.layout.world, {self.rank: piece}, piece, guard.all_reduce)
                if keep:
                    whole[(name, kind)] = buffer.cpu()
        optimizer = None
        if keep:
            names = {id(p): name for name, p in trainer.raw_model.named_parameters()}
            order = [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]
            state = {}
            if adam_step > 0:
                for index, name in enumerate(order):
                    state[index] = {"step": torch.tensor(adam_step)} | {k: whole[(name, k)] for k in KINDS[1:]}
            groups = trainer.optimizer.state_dict()["param_groups"]
            optimizer = {"state": state, "param_groups": groups}
        model = {name: whole[(name, "param")] for name in self.shapes} if keep else {}
        return {"model": model, "optimizer": optimizer, "small": self.small_state()}

    # ------------------------------------------------------------------ re-forming
    def regroup(self, generation: Generation) -> int:
        """Collective over the new generation's group: restore the newest state every shard
        of which survives, re-sharded for this world size; returns its step."""
        trainer = self.trainer
        gathered: list[Any] = [None] * generation.world_size
        dist.all_gather_object(gathered, self.holdings().to_json())
        try:
            plan = plan_restore([Holdings.from_json(h) for h in gathered])
        except NoShardCopy as error:
            raise NoLiveState(f"generation {generation.number}: {error}; load the disk checkpoint") from error
        me = generation.rank
        layout = Layout(generation.number, generation.world_size)
        source = self._small_at(plan.step) if me == plan.small_source else None
        small = broadcast_state(source, plan.small_source, None, trainer.ctx.device)
        live = self.live_pieces()
        writes = self._pieces_for(plan, me, live)
        if self.committed and self.layout is not None and not self._held(self.own, self.layout, trainer.progress.step):
            # The old live shards stay restorable until the new generation has committed.
            # A layout that never committed holds nothing its sources do not: keeping it
            # would only push a useful copy out of the ring when re-forms repeat.
            old = self.pack_live().to("cpu", copy=True)
            self._keep(self.own, Snapshot(self.layout, self.rank, trainer.progress.step, old, self.small_state()))
        model = trainer.build_sharded_model()
        moments = float(small["adam_step"]) > 0
        new_moments: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                start, end = chunk_rows(self.shapes[name][0], layout.world, me)
                for kind in KINDS if moments else KINDS[:1]:
                    whole = self._assemble(plan, me, name, kind, live, writes)
                    mine = whole[start:end].to(trainer.ctx.device)
                    if kind == "param":
                        _local(param).copy_(mine)
                    else:
                        new_moments.setdefault(name, {})[kind] = mine.clone()
        del live, writes
        optimizer = trainer.install_sharded(model)
        if moments:
            step = torch.tensor(float(small["adam_step"]))
            for name, param in model.named_parameters():
                placed = {kind: _like(param, value) for kind, value in new_moments[name].items()}
                optimizer.state[param] = {"step": step.clone(), **placed}
        before = trainer.progress.step if (self.whole or self.layout is not None) else None
        trainer.load_small_state(small)
        kinds = [kind for _, kind in plan.writers.values()]
        trainer.events(
            "resharded",
            {
                "gen": generation.number,
                "step": plan.step,
                "world_before": plan.layout.world if plan.layout else None,
                "world_after": layout.world,
                "from_whole": plan.full_source is not None,
                "from_copies": kinds.count("ward"),
                "from_snapshots": kinds.count("own"),
                "rolled_back": None if before is None else before - plan.step,
            },
        )
        self.layout, self.rank, self.whole, self.committed = layout, me, False, False
        return plan.step

    def _held(self, ring: list[Snapshot], layout: Layout, step: int) -> bool:
        return any(s.layout == layout and s.step == step for s in ring)

    def _small_at(self, step: int) -> dict[str, Any]:
        if step == self.trainer.progress.step:
            return self.small_state()
        for snapshot in reversed(self.own):
            if snapshot.step == step and snapshot.small is not None:
                return snapshot.small
        raise NoLiveState(f"the schedule and data positions of step {step} are not held here")

    def _pieces_for(self, plan: Any, me: int, live: dict[tuple[str, str], torch.Tensor]) -> dict[int, Any]:
        """Old rank -> the (parameter, kind) rows this member writes for it."""
        out: dict[int, Any] = {}
        for old_rank, (member, kind) in plan.writers.items():
            if member != me:
                continue
            if kind == "live":
                out[old_rank] = live
                continue
            ring = self.own if kind == "own" else self.wards
            wanted = (plan.layout, old_rank, plan.step)
            snapshot = next(s for s in reversed(ring) if (s.layout, s.rank, s.step) == wanted)
            out[old_rank] = self.pieces(snapshot.flat, old_rank, plan.layout.world)
        return out

    def _assemble(
        self,
        plan: Any,
        me: int,
        name: str,
        kind: str,
        live: dict[tuple[str, str], torch.Tensor],
        writes: dict[int, Any],
    ) -> torch.Tensor:
        """The whole tensor (CPU): this process's own copy when every member holds the whole
        state, else the sum of every writer's rows (each row has exactly one writer)."""
        piece = live[(name, kind)]
        if plan.everyone_full:
            return piece.detach().cpu()
        if plan.full_source is not None:  # one member writes the whole tensor
            rows, world = ({0: piece} if plan.full_source == me else {}), 1
        else:
            rows, world = {rank: held[(name, kind)] for rank, held in writes.items()}, plan.layout.world
        return whole_from_rows(self.shapes[name], world, rows, piece, dist.all_reduce).cpu()


def live_pieces(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, kind) -> this rank's rows of each parameter and its Adam moments (zeros
    before the first step)."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, param in model.named_parameters():
        local = _local(param.detach())
        out[(name, "param")] = local
        moments = optimizer.state.get(param, {})
        for kind in KINDS[1:]:
            value = moments.get(kind)
            out[(name, kind)] = _local(value) if value is not None else torch.zeros_like(local)
    return out


def pack(pieces: dict[tuple[str, str], torch.Tensor], names: list[str]) -> torch.Tensor:
    """One flat tensor of `pieces`, KINDS per parameter in `names` order."""
    return torch.cat([pieces[(name, kind)].reshape(-1) for name in names for kind in KINDS])


def send_to_buddy(flat: torch.Tensor, received: torch.Tensor, buddy: int, ward: int, world: int) -> dist.Work:
    """Start sending `flat` to `buddy` and receiving the ward's into `received`.

    One all-to-all in which each rank sends only to its buddy: gloo's point-to-point works
    cannot be polled (is_completed stays False until wait()), and a collective can, so a
    peer lost mid-transfer is noticed like in a step's collectives."""
    send_sizes, receive_sizes = [0] * world, [0] * world
    send_sizes[buddy], receive_sizes[ward] = flat.numel(), received.numel()
    work = dist.all_to_all_single(received, flat, receive_sizes, send_sizes, async_op=True)
    assert work is not None
    return work


def whole_from_rows(
    shape: tuple[int, ...],
    world: int,
    rows: dict[int, torch.Tensor],
    like: torch.Tensor,
    reduce: Callable[[torch.Tensor], Any],
) -> torch.Tensor:
    """A whole tensor from rows of a `world`-rank layout: each rank's rows written where
    torch.chunk puts them (zeros elsewhere), then summed over the group by `reduce`; every
    row has exactly one writer among the members."""
    whole = torch.zeros(shape, dtype=like.dtype, device=like.device)
    for rank, piece in rows.items():
        start, end = chunk_rows(shape[0], world, rank)
        whole[start:end].copy_(piece)
    reduce(whole)
    return whole


def _row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape[1:]:
        n *= size
    return n


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view FSDP2 reads from), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """An optimizer moment placed like its (sharded) parameter."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return local
