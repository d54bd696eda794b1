"""The trainer's process group: set-up from torchrun's environment and the few small
collectives the loop needs (stop flags, step statistics, RNG states, barriers).

Outside torchrun (tests, a quick local run) a one-process gloo group over an in-memory
store is created, so the loop runs the same collectives in every setting.  The bmtrain
backend has its own NCCL communicator and subclasses `Dist` (`bmtrain_backend.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "max"]


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

    def all_reduce(self, values: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """All-reduce a small tensor (moved to the compute device); the result is on the CPU."""
        buffer = values.to(self.device)
        if self.world_size > 1:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return buffer.cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (all-reduce MAX)."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), "max")[0] > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# FM9G_DEVICE=cpu keeps a process on the CPU (gloo, fp32) on a machine that has GPUs: the
# CPU-semantics tests (bit-exact resume, DDP == FSDP2) then mean the same thing on a GPU box.
ENV_DEVICE = "FM9G_DEVICE"


class DeviceError(RuntimeError):
    """This rank has no device to run on; the message says why and what to change."""


def use_cuda() -> bool:
    """True when this process trains on a GPU: CUDA is there and FM9G_DEVICE does not say cpu."""
    return os.environ.get(ENV_DEVICE, "").lower() != "cpu" and torch.cuda.is_available()


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's group (gloo on CPU, nccl on GPU), or make a one-process group."""
    cuda = use_cuda()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local_rank >= torch.cuda.device_count():
        # Without this check torch.cuda.set_device fails with a bare "invalid device ordinal".
        raise DeviceError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most that "
            "many processes per node (cluster.procs_per_node / gpus_per_node), or set FM9G_DEVICE=cpu"
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        timeout = timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
        owns_group=owns,
    )
