"""AdamW for FM9G: betas (0.9, 0.95) and two param groups for muP.

Like the FM9G trainer, every parameter whose name ends in `.weight` and is not a norm,
the embedding or the lm head (i.e. the hidden matrices) trains at lr / scale_width; the
rest trains at lr.  Both groups use the configured weight decay, as FM9G's optimizer
did (it applied one weight_decay to all parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

BETAS = (0.9, 0.95)


def is_hidden_matrix(name: str) -> bool:
    """True for the muP-scaled parameters: hidden `.weight`s, not norms, embedding or lm head."""
    # DDP/FSDP/compile wrappers prefix names ("module.", "_orig_mod."); judge the tail.
    return (
        name.endswith(".weight")
        and "layernorm" not in name
        and not name.endswith("input_embedding.weight")
        and not name.endswith("lm_head.weight")
    )


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, scale_width: float) -> list[dict[str, Any]]:
    """[matrices at lr / scale_width, everything else at lr]; empty groups are dropped."""
    scaled, plain = [], []
    for name, param in named:
        if param.requires_grad:
            (scaled if is_hidden_matrix(name) else plain).append(param)
    groups = [
        {"params": scaled, "lr": lr / scale_width, "name": "matrices"},
        {"params": plain, "lr": lr, "name": "others"},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, scale_width: float, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters in the two muP groups."""
    # foreach: one fused kernel per group on CPU and GPU, and bitwise repeatable.
    return torch.optim.AdamW(
        param_groups(model.named_parameters(), lr, scale_width),
        lr=lr,
        betas=BETAS,
        eps=eps,
        weight_decay=weight_decay,
        foreach=True,
    )
