"""Training backends: how the model is sharded, stepped and checkpointed.

The trainer loop (`train.py`) is one loop for every backend; it only calls the methods of
`Backend`.  `model.backend` picks one:

  torch    DDP (replicated weights, all-reduced grads) or, with `model.fsdp`, FSDP2
           `fully_shard` per layer and root; gloo on CPU, NCCL on GPU.
  bmtrain  BMTrain ZeRO-3 (`bmtrain_backend.py`), GPU only, imported only when chosen.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from fm9g.model.distributed import Dist, init_distributed
from fm9g.model.optim import build_optimizer


class BackendError(RuntimeError):
    """The chosen backend cannot run here; the message says why and what to change."""


class Backend(Protocol):
    """What the trainer loop needs from a backend; every method with collectives runs on all ranks."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    can_skip_a_batch: bool  # a step that raised (CUDA OOM) can be dropped and training goes on

    def wrap(self, model: nn.Module) -> nn.Module:
        """Distribute a built (and possibly loaded) model; returns the module to call."""

    def build_optimizer(self, *, lr: float, weight_decay: float, scale_width: float) -> torch.optim.Optimizer:
        """AdamW-style optimizer in the two muP groups over the wrapped model."""

    def accumulation(self, last: bool) -> AbstractContextManager[Any]:
        """Context for one micro-batch's forward/backward; gradients sync on the `last` one."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's mean loss; the backend averages gradients over ranks."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip all gradients to `max_norm` together; the global norm before clipping."""

    def step(self) -> None: ...

    def model_state(self) -> dict[str, torch.Tensor]:
        """Collective: the full model state dict (FM9G keys, CPU) on rank 0."""

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state, as saved to `<name>-<step>.rank-<r>.opt`."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class TorchBackend:
    """DDP, or FSDP2 sharding, with torch's AdamW."""

    def __init__(self, ctx: Dist, fsdp: bool) -> None:
        self.ctx, self.fsdp = ctx, fsdp
        self.name = "torch-fsdp2" if fsdp else "torch-ddp"
        self.can_skip_a_batch = True

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.encoder.layers:
                fully_shard(layer)
            fully_shard(model)
            self.model = model
        else:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return self.model

    def build_optimizer(self, *, lr: float, weight_decay: float, scale_width: float) -> torch.optim.Optimizer:
        self.optimizer = build_optimizer(self.model, lr=lr, weight_decay=weight_decay, scale_width=scale_width)
        return self.optimizer

    def accumulation(self, last: bool) -> AbstractContextManager[Any]:
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.model.no_sync()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # DDP and FSDP2 average the gradients over ranks

    def clip_grad_norm(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def step(self) -> None:
        self.optimizer.step()

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {key: value.detach().cpu() for key, value in self.model.module.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        if self.fsdp:  # FSDP2 DTensor shards are saved as this rank's local tensors
            from torch.distributed.tensor import DTensor

            state["state"] = {
                index: {
                    name: value.to_local() if isinstance(value, DTensor) else value for name, value in entry.items()
                }
                for index, entry in state["state"].items()
            }
        return state

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.fsdp:  # the inverse of optimizer_state: shards re-wrapped like their parameters
            from torch.distributed.tensor import DTensor

            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            for index, entry in state["state"].items():
                param = params[int(index)]
                if isinstance(param, DTensor):
                    for name, value in entry.items():
                        if value.dim() > 0:
                            entry[name] = DTensor.from_local(
                                value.to(param.device),
                                param.device_mesh,
                                param.placements,
                                shape=param.shape,
                                stride=param.stride(),
                            )
        self.optimizer.load_state_dict(state)


def init_process_group(backend: str) -> Dist:
    """This rank's process group for `model.backend` (bmtrain brings its own communicator)."""
    if backend == "bmtrain":
        from fm9g.model.bmtrain_backend import init_bmtrain

        return init_bmtrain()
    return init_distributed()


def make_backend(
    backend: str, ctx: Dist, *, fsdp: bool, use_checkpoint: bool, bf16: bool, offload: bool | None
) -> Backend:
    """The `model.backend` implementation for this rank."""
    if backend == "bmtrain":
        from fm9g.model.bmtrain_backend import BMTrainBackend

        return BMTrainBackend(ctx, use_checkpoint=use_checkpoint, bf16=bf16, offload=offload)
    return TorchBackend(ctx, fsdp)
