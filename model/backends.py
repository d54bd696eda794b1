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

    def optimizer_state(self) -> dict[str, Any] | None:
        """This rank's optimizer state, as saved to `<name>-<step>.rank-<r>.opt` (None: not saved)."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...


class TorchBackend:
    """DDP, or FSDP2 sharding, with torch's AdamW."""

    def __init__(self, ctx: Dist, fsdp: bool, bf16: bool = False) -> None:
        self.ctx, self.fsdp, self.bf16 = ctx, fsdp, bf16
        self.name = "torch-fsdp2" if fsdp else "torch-ddp"
        # One rank without a DDP wrapper can drop a batch that ran out of memory: DDP's reducer
        # is left mid-reduction by an OOM in backward and the next forward raises "Expected to
        # have finished reduction in the prior iteration" (pytorch#18853).  FSDP2 keeps
        # unsharded parameters and pending reduce-scatters of a failed backward, so it never skips.
        self.can_skip_a_batch = not fsdp and ctx.world_size == 1
        self.ddp = False

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.fsdp:
            self.model = self.shard(model)
        elif self.ctx.world_size == 1:
            # Nothing to all-reduce with one rank; DDP would only add its reducer (and its
            # unrecoverable state after an OOM, see can_skip_a_batch).
            self.model = model
        else:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead
            # of a second fp32 copy of them (4 bytes per parameter: 11 GB for the 2.4b).
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
            self.ddp = True
        return self.model

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 over the default process group: each layer, then the root (embedding, norm, head)."""
        from torch.distributed.fsdp import fully_shard

        policy = self.mixed_precision()
        for layer in model.encoder.layers:
            fully_shard(layer, **policy)
        fully_shard(model, **policy)
        return model

    def mixed_precision(self) -> dict[str, Any]:
        """FSDP2's `mp_policy` for bf16 runs: bf16 all-gathers and compute, fp32 gradient reduction.

        Without it FSDP2 all-gathers the fp32 masters (twice the bytes) and autocast re-casts
        every weight in each forward and recompute.  fp32 runs (the CPU default) get no policy.
        """
        if not self.bf16:
            return {}
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}

    def build_optimizer(self, *, lr: float, weight_decay: float, scale_width: float) -> torch.optim.Optimizer:
        self.optimizer = build_optimizer(self.model, lr=lr, weight_decay=weight_decay, scale_width=scale_width)
        return self.optimizer

    def accumulation(self, last: bool) -> AbstractContextManager[Any]:
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return self.model.no_sync() if self.ddp and not last else nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # DDP and FSDP2 average the gradients over ranks

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return global_norm(norm)

    def step(self) -> None:
        self.optimizer.step()

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ctx.is_main:
            return {}  # replicated weights: only rank 0 copies them to host memory and writes them
        module = self.model.module if self.ddp else self.model
        return {key: value.detach().cpu() for key, value in module.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any] | None:
        if not self.fsdp and not self.ctx.is_main:
            # DDP's Adam state is replicated: rank 0's file is every rank's (the loader maps
            # rank r onto file r % 1).  Saving it from every rank cost a full host copy per GPU.
            return None
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
                                local_rows(value, param).to(param.device),
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
    return TorchBackend(ctx, fsdp, bf16=bf16)


def local_rows(value: torch.Tensor, param: Any) -> torch.Tensor:
    """This rank's rows of an optimizer moment saved whole (a DDP or in-process checkpoint),
    cut as FSDP2 cut its parameter; a moment saved as a shard passes through."""
    from fm9g.model.shard_plan import chunk_rows

    local = param.to_local()
    if tuple(value.shape) == tuple(param.shape) and tuple(local.shape) != tuple(param.shape):
        start, end = chunk_rows(value.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank())
        return value[start:end]
    return value


def global_norm(norm: torch.Tensor) -> float:
    """The norm `clip_grad_norm_` returned, as one number that is the same on every rank.

    Over FSDP2's DTensor gradients it is a DTensor with a `_NormPartial` placement whose
    local value is this rank's partial norm (pytorch#166638); `full_tensor()` reduces the
    partials (sqrt of the sum of squares) to the global norm, as the clipping itself used.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
