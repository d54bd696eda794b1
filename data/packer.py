"""Pack windows into fixed [batch_size, max_length] tensors for varlen attention.

Each row holds whole windows back to back; what is left of a row is padding that is
its own segment (input 0, target -100, task -1), as in the original
UnpadBatchedMixedDataset. `cu_seqlens` are the segment boundaries over the flattened
B×L tokens, padding segments included, so flash-attn varlen sees every position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fm9g.data.samples import IGNORE

# One placed window: (task id, src, tgt).
Placed = tuple[int, np.ndarray, np.ndarray]


def pack_rows(rows: list[list[Placed]], batch_size: int, max_length: int, task_names: list[str]) -> dict[str, Any]:
    """The batch dict for `rows` (at most batch_size rows, each at most max_length tokens)."""
    input_ids = np.zeros((batch_size, max_length), dtype=np.int64)
    targets = np.full((batch_size, max_length), IGNORE, dtype=np.int64)
    position_ids = np.zeros((batch_size, max_length), dtype=np.int64)
    segment_ids = np.zeros((batch_size, max_length), dtype=np.int32)
    task_ids = np.full((batch_size, max_length), -1, dtype=np.int32)
    positions = np.arange(max_length, dtype=np.int64)
    bounds = [0]
    real = 0
    for r in range(batch_size):
        placed = rows[r] if r < len(rows) else []
        offset = 0
        for number, (task, src, tgt) in enumerate(placed):
            end = offset + len(src)
            input_ids[r, offset:end] = src
            targets[r, offset:end] = tgt
            position_ids[r, offset:end] = positions[: len(src)]
            segment_ids[r, offset:end] = number
            task_ids[r, offset:end] = task
            offset = end
            bounds.append(r * max_length + end)
        real += offset
        if offset < max_length:
            segment_ids[r, offset:] = len(placed)  # the padding tail: its own segment
            position_ids[r, offset:] = positions[: max_length - offset]
            bounds.append((r + 1) * max_length)
    cu_seqlens = np.asarray(bounds, dtype=np.int32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "targets": torch.from_numpy(targets),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "task_ids": torch.from_numpy(task_ids),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(np.diff(cu_seqlens).max()),
        "num_tokens": real,
        "task_names": list(task_names),
    }
