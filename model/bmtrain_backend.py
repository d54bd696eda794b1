"""The bmtrain backend: BMTrain ZeRO-3, as the original FM9G trainer ran (GPU only).

Imported only when `model.backend: bmtrain` is chosen; `bmtrain` itself is imported on
first use, so the torch backend never needs it installed.  Written against BMTrain 1.0
(`make gpu-train-env` builds an environment with it):

  - `bmt.init_distributed` joins torchrun's rendezvous (RANK, WORLD_SIZE, MASTER_ADDR/PORT)
    and builds BMTrain's own NCCL communicator.  BMTrain forbids `torch.distributed`
    next to it, so the loop's small collectives (`BMTrainDist`) go through BMTrain too.
  - Each encoder layer becomes a `bmt.Block` (ZeRO-3 partitioned, gathered on entry,
    gradients reduce-scattered on exit, recomputed in backward when `train.use_checkpoint`),
    chained in a `bmt.TransformerBlockList` so communication overlaps compute;
    the embedding and final norm are `DistributedParameter`s gathered where they are used.
    Parameter names, and so checkpoint keys, are unchanged: FM9G keys.
  - With bf16 the weights themselves are bf16 and BMTrain's Adam keeps fp32 masters, as
    in FM9G: `AdamOffloadOptimizer` (Adam states on the CPU, FM9G's `--offload`) unless
    `model.offload: false`.  Its bf16 kernels decay the weights as AdamW does.  In fp32,
    BMTrain's Adam would add the decay to the gradient (L2) instead, so fp32 uses torch's
    AdamW on the partitions: the same update as the torch backend.
    `OptimManager(loss_scale=None)`: bf16 needs no loss scale.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fm9g.model.backends import BackendError
from fm9g.model.distributed import Dist, ReduceOp
from fm9g.model.optim import BETAS, param_groups


def import_bmtrain() -> ModuleType:
    """bmtrain, or a BackendError that says why it cannot run here."""
    if not torch.cuda.is_available():
        raise BackendError(
            "model.backend=bmtrain needs CUDA GPUs (BMTrain's ZeRO-3 runs on NCCL); on a CPU use model.backend: torch"
        )
    try:
        import bmtrain
    except (ImportError, OSError) as exc:  # OSError: the wheel's libnccl.so is missing
        raise BackendError(
            f"model.backend=bmtrain: bmtrain cannot be imported ({exc}); build the training environment "
            "with `make gpu-train-env` and set cluster.train_env to it, or use model.backend: torch "
            "(model.fsdp: true shards like ZeRO-3)"
        ) from None
    if not hasattr(bmtrain, "Block"):
        raise BackendError(
            f"model.backend=bmtrain needs BMTrain >= 1.0 (bmt.Block); found "
            f"{getattr(bmtrain, '__version__', 'an older version')}: pip install 'bmtrain>=1.0'"
        )
    return bmtrain


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class BMTrainDist(Dist):
    """`Dist` over BMTrain's communicator (BMTrain and torch.distributed do not mix)."""

    bmt: Any = None

    def barrier(self) -> None:
        self.bmt.synchronize()

    def all_reduce(self, values: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return values.clone()
        with torch.no_grad():
            return self.bmt.distributed.all_reduce(values.to(self.device).contiguous(), op).cpu()

    def gather_objects(self, obj: Any) -> list[Any]:
        return list(self.bmt.store.allgather_objects(obj))

    def close(self) -> None:
        pass  # BMTrain has no teardown; its communicator ends with the process


def init_bmtrain() -> BMTrainDist:
    """Join the job through BMTrain; outside torchrun, a one-process job on a free local port."""
    bmt = import_bmtrain()
    if "WORLD_SIZE" not in os.environ:  # a quick local run: what torchrun would have set
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }.items():
            os.environ.setdefault(key, value)
    if not bmt.config["initialized"]:  # once per process: BMTrain keeps one global communicator
        bmt.init_distributed(seed=0)  # the trainer seeds everything itself right after
    local_rank = int(bmt.config["local_rank"])
    return BMTrainDist(
        rank=bmt.rank(),
        world_size=bmt.world_size(),
        local_rank=local_rank,
        local_world_size=int(bmt.config["local_size"]),
        device=torch.device("cuda", local_rank),
        owns_group=False,
        bmt=bmt,
    )


class BMTrainBackend:
    """ZeRO-3 blocks, BMTrain's Adam and OptimManager behind the `Backend` methods."""

    def __init__(self, ctx: Dist, *, use_checkpoint: bool, bf16: bool, offload: bool | None) -> None:
        self.bmt = import_bmtrain()
        if offload and not bf16:
            raise BackendError(
                "model.offload: true needs bf16 weights (BMTrain's CPU Adam decays fp32 weights as "
                "L2, not AdamW): set model.dtype to bf16 (or auto), or model.offload: false"
            )
        self.ctx, self.use_checkpoint, self.bf16 = ctx, use_checkpoint, bf16
        self.offload = bf16 and offload is not False  # on by default, as FM9G always passed --offload
        self.name = "bmtrain-zero3" + ("-offload" if self.offload else "")
        self.can_skip_a_batch = False  # a Block that failed mid-forward keeps its gathered state

    def wrap(self, model: nn.Module) -> nn.Module:
        bmt = self.bmt
        if self.bf16:
            model.to(torch.bfloat16)  # FM9G trained bf16 weights; fp32 masters live in the optimizer
        # A TransformerBlockList chains its Blocks (set_pre_module, first/last flags), so BMTrain's
        # hooks gather the next block's parameters and reduce-scatter the previous block's
        # gradients on a side stream while this one computes; standalone Blocks synchronise per
        # layer (BMTrain README, "Step 3").  The chaining lives in the hooks, so Encoder.forward
        # still calls the blocks in order, as TransformerBlockList.forward itself does.  Children
        # are registered as "0", "1", ...: the parameter names (FM9G keys) do not change.
        model.encoder.layers = bmt.TransformerBlockList(
            [
                bmt.Block(bmt.BMTrainModelWrapper(layer), use_checkpoint=self.use_checkpoint)
                for layer in model.encoder.layers
            ]
        )
        model.encoder.checkpoint_layers = False  # each Block recomputes itself when use_checkpoint is on
        # The rest (embedding, final norm, untied head) becomes DistributedParameters, gathered on
        # access; BMTrainModelWrapper keeps a TransformerBlockList as it is.
        self.model = bmt.BMTrainModelWrapper(model)
        return self.model

    def build_optimizer(self, *, lr: float, weight_decay: float, scale_width: float) -> torch.optim.Optimizer:
        optim = self.bmt.optim
        groups = param_groups(self.model.named_parameters(), lr, scale_width)
        if self.bf16:
            adam = optim.AdamOffloadOptimizer if self.offload else optim.AdamOptimizer
            self.optimizer = adam(groups, lr=lr, betas=BETAS, weight_decay=weight_decay)
        else:  # OptimManager steps a plain torch optimizer as it is
            self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=weight_decay, foreach=True)
        self.manager = optim.OptimManager(loss_scale=None)  # our scheduler steps separately, as with torch
        self.manager.add_optimizer(self.optimizer)
        return self.optimizer

    def accumulation(self, last: bool) -> AbstractContextManager[Any]:
        return nullcontext()  # every backward reduce-scatters into the partitioned gradients

    def zero_grad(self) -> None:
        self.manager.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.manager.backward(loss)  # scales by 1/world_size: the reduce-scatter sums over ranks

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(self.manager.clip_grad_norm(self.optimizer.param_groups, max_norm))

    def step(self) -> None:
        self.manager.step()

    def model_state(self) -> dict[str, torch.Tensor]:
        torch.cuda.synchronize()
        state = self.bmt.store._save_to_rank0(self.model)  # gathers every partition; CPU tensors on rank 0
        return dict(state) if self.ctx.is_main else {}

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()  # this rank's partitions, like FM9G's .rank-<r>.opt

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
