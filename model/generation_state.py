"""State from a peer: one member broadcasts a state_dict-style payload (nested dicts,
lists and tuples of tensors and small plain values) and the others rebuild it.

The receiver allocates from the sender's description, not from its own objects: a
replacement's optimizer has no per-parameter state yet (Adam creates it on the first
step), so its own state_dict has nothing to receive into.  Tensors travel in a few flat
buffers, one per dtype and size bucket, because one collective per tensor costs a round
trip each; the skeleton travels as JSON with tagged nodes, so integer dict keys (the
optimizer's parameter ids) and tuples (Adam's betas) come back as they were.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 * 2**20  # bounds the extra memory a flat buffer costs on each side


class PeerState(Protocol):
    """What a caller hands in: its own state_dict/load_state_dict (model, optimizer,
    schedule, step counter, data-loader slot, RNG, all in one dict)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateSyncError(RuntimeError):
    """The payload cannot be described or rebuilt; the message names the offending entry."""


def describe(state: Any) -> tuple[Any, list[torch.Tensor]]:
    """(skeleton, tensors): the skeleton is JSON-able, tensors are replaced by their index."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return {"t": len(tensors) - 1, "shape": list(node.shape), "dtype": str(node.dtype).removeprefix("torch.")}
        if isinstance(node, dict):
            return {"d": [[_key(k, path), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"u": [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return {"l": [walk(v, f"{path}[{i}]") for i, v in enumerate(node)]}
        if node is None or isinstance(node, bool | int | float | str):
            return {"v": node}
        raise StateSyncError(
            f"state entry {path or '<root>'} is a {type(node).__name__}; a peer payload holds only tensors, "
            "dicts, lists, tuples and plain numbers/strings (convert it in the caller's state_dict)"
        )

    return walk(state, ""), tensors


def _key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, bool | int | float | str):
        return key
    raise StateSyncError(f"state key {key!r} under {path or '<root>'} is not a plain number or string")


def rebuild(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of `describe`."""
    if "t" in skeleton:
        return tensors[skeleton["t"]]
    if "d" in skeleton:
        return {k: rebuild(v, tensors) for k, v in skeleton["d"]}
    if "u" in skeleton:
        return tuple(rebuild(v, tensors) for v in skeleton["u"])
    if "l" in skeleton:
        return [rebuild(v, tensors) for v in skeleton["l"]]
    return skeleton["v"]


def _specs(skeleton: Any) -> list[tuple[list[int], torch.dtype]]:
    """Shape and dtype of every tensor in a skeleton, in index order."""
    found: dict[int, tuple[list[int], torch.dtype]] = {}

    def walk(node: Any) -> None:
        if "t" in node:
            found[node["t"]] = (node["shape"], getattr(torch, node["dtype"]))
        for key in ("u", "l"):
            for child in node.get(key, ()):
                walk(child)
        for _, child in node.get("d", ()):
            walk(child)

    walk(skeleton)
    return [found[i] for i in range(len(found))]


def _buckets(specs: list[tuple[list[int], torch.dtype]]) -> list[tuple[torch.dtype, list[int]]]:
    """Tensor indices grouped by dtype, each group cut at BUCKET_BYTES."""
    out: list[tuple[torch.dtype, list[int]]] = []
    open_bucket: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, (shape, dtype) in enumerate(specs):
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        members, used = open_bucket.get(dtype, ([], 0))
        if members and used + size > BUCKET_BYTES:
            out.append((dtype, members))
            members, used = [], 0
        open_bucket[dtype] = ([*members, i], used + size)
    out.extend((dtype, members) for dtype, (members, _) in open_bucket.items() if members)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def broadcast_state(
    state: dict[str, Any] | None, src: int, group: dist.ProcessGroup | None, device: torch.device
) -> dict[str, Any]:
    """Collective: rank `src` passes its state, every other rank passes None and gets a copy
    (tensors on `device`).  Returns the sender's own dict on the sender."""
    sending = dist.get_rank(group) == src
    if sending:
        assert state is not None, "the sending rank passes its state"
        skeleton, tensors = describe(state)
        blob = torch.frombuffer(bytearray(json.dumps(skeleton).encode()), dtype=torch.uint8)
        length = torch.tensor([blob.numel()], dtype=torch.int64)
    else:
        length = torch.zeros(1, dtype=torch.int64)
    length = _broadcast(length, src, group, device)
    if not sending:
        blob = torch.empty(int(length.item()), dtype=torch.uint8)
    blob = _broadcast(blob, src, group, device)
    if not sending:
        skeleton = json.loads(bytes(blob.cpu().numpy()))
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in _specs(skeleton)]
    for dtype, members in _buckets(_specs(skeleton)):
        if sending:
            flat = torch.cat([tensors[i].detach().reshape(-1).to(device, dtype) for i in members])
        else:
            flat = torch.empty(sum(tensors[i].numel() for i in members), dtype=dtype, device=device)
        flat = _broadcast(flat, src, group, device)
        if not sending:
            offset = 0
            for i in members:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset : offset + n].view(tensors[i].shape))
                offset += n
    return state if sending and state is not None else rebuild(skeleton, tensors)


def _broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None, device: torch.device) -> torch.Tensor:
    on_device = tensor.to(device)
    dist.broadcast(on_device, src, group=group)
    return on_device
