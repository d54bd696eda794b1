"""The trainer's process group: set-up from torchrun's environment, the few collectives
the loop needs, and wrapping the model for data parallelism (DDP, or FSDP2 sharding).

Outside torchrun (tests, a quick local run) a one-process gloo group over an in-memory
store is created, so the loop runs the same collectives in every setting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place in the job and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_group: bool  # True when this object created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        # gloo barrier on CPU; on NCCL pin the device so no stray context lands on GPU 0.
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def all_reduce(self, values: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small tensor in place (moved to the compute device) and return it on the CPU."""
        buffer = values.to(self.device)
        if self.world_size > 1:
            dist.all_reduce(buffer, op=op)
        return buffer.cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (all-reduce MAX)."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX)[0] > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's group (gloo on CPU, nccl on GPU), or make a one-process group."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        timeout = timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=device, owns_group=owns)


def wrap_model(model: nn.Module, ctx: Dist, fsdp: bool) -> nn.Module:
    """DDP (replicated weights, all-reduced grads) or FSDP2 `fully_shard` per layer and root."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The Dragonfly inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """Collective under FSDP: the full state dict on rank 0 (CPU); DDP: this rank's copy."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().cpu() for key, value in unwrap(model).state_dict().items()}


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's optimizer state; FSDP2 DTensor shards are saved as their local tensors."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    state["state"] = {index: {name: value.to_local() if isinstance(value, DTensor) else value
                              for name, value in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `local_optimizer_state`: shards are re-wrapped like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            for name, value in entry.items():
                if value.dim() > 0:
                    entry[name] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                     shape=param.shape, stride=param.stride())
    optimizer.load_state_dict(state)
