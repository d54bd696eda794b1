"""Attention kernels for packed sequences: torch SDPA (default) and flash-attn varlen.

A packed row holds several samples one after another; a token may only attend to
earlier tokens of its own sample.  A kernel turns the batch's packing description
(segment_ids, cu_seqlens) into a context once per forward pass, and every layer calls
that context with its q/k/v.  The model file only knows the `AttentionKernel` protocol;
the trainer picks the kernel with `select_attention` and installs it with
`set_attention`, so flash-attn stays an optional, lazily imported GPU extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

FlashMode = Literal["auto", "cuda", "none"]


class AttentionContext(Protocol):
    """Attends q/k/v of one layer under the batch's packing."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """q [B, L, H, D], k/v [B, L, Hkv, D] -> [B, L, H*D]."""
        ...


class AttentionKernel(Protocol):
    """Builds the per-forward context from the packing description."""

    def prepare(
        self,
        segment_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        shape: tuple[int, int],
    ) -> AttentionContext: ...


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, L, L] (True = may attend) from segment_ids [B, L]."""
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)  # [B, 1, L, L]


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened sample boundaries (int32 [n+1]) and the longest sample, from segment_ids [B, L]."""
    batch, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    # A sample starts at each row start and wherever the segment id changes within a row.
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([batch * length], device=flat.device)])
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())


@dataclass
class _SdpaContext:
    mask: torch.Tensor | None  # None: every row is one sample, plain causal attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        batch, length, heads, dim = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views, no copies
        # GQA without materialising repeated k/v heads.
        gqa = {"enable_gqa": True} if k.shape[1] != heads else {}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, dropout_p=dropout_p, is_causal=self.mask is None, **gqa
        )
        return out.transpose(1, 2).reshape(batch, length, heads * dim)  # [B, L, H*D]


class SdpaAttention:
    """torch SDPA: `is_causal` when each row is a single sample, else a block-diagonal mask."""

    def prepare(
        self,
        segment_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        shape: tuple[int, int],
    ) -> AttentionContext:
        # One host sync per forward (not per layer) decides whether the cheap causal path applies.
        if segment_ids is None or bool((segment_ids == segment_ids[:, :1]).all()):
            return _SdpaContext(mask=None)
        return _SdpaContext(mask=packed_causal_mask(segment_ids))


@dataclass
class _FlashContext:
    cu_seqlens: torch.Tensor
    max_seqlen: int
    deterministic: bool

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func  # lazy: GPU-only extra

        batch, length, heads, dim = q.shape
        # [B, L, H, D] -> [B*L, H, D]: flash-attn varlen wants the flattened token axis.
        out = flash_attn_varlen_func(
            q.reshape(batch * length, heads, dim),
            k.reshape(batch * length, k.shape[2], dim),
            v.reshape(batch * length, v.shape[2], dim),
            self.cu_seqlens,
            self.cu_seqlens,
            self.max_seqlen,
            self.max_seqlen,
            dropout_p=dropout_p,
            causal=True,
            # False (flash-attn's default) accumulates dQ with atomics: fast, not bit-repeatable.
            deterministic=self.deterministic,
        )
        return out.reshape(batch, length, heads * dim)  # [B, L, H*D]


class FlashAttention:
    """flash-attn `flash_attn_varlen_func` over cu_seqlens (CUDA, fp16/bf16 only)."""

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic

    def prepare(
        self,
        segment_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        shape: tuple[int, int],
    ) -> AttentionContext:
        if cu_seqlens is None or max_seqlen is None:
            if segment_ids is None:
                batch, length = shape
                # Built on the GPU: flash-attn refuses CPU cu_seqlens, and nothing else here says where q lives.
                cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
                max_seqlen = length
            else:
                cu_seqlens, max_seqlen = cu_seqlens_from_segments(segment_ids)
        device = segment_ids.device if segment_ids is not None else cu_seqlens.device
        return _FlashContext(
            cu_seqlens.to(device=device, dtype=torch.int32), int(max_seqlen), deterministic=self.deterministic
        )


def probe_flash() -> str | None:
    """None when flash-attn works here, else why not (shown when `auto` falls back to SDPA).

    `find_spec` is not enough: the most common broken install is a wheel built for another
    torch/CUDA/C++ ABI, whose `flash_attn_2_cuda` extension fails to load (undefined symbol)
    only when imported, and a kernel can still fail to launch on a GPU it was not built for.
    So the probe imports the function and runs it once on a tiny bf16 batch.
    """
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 -- any import failure means: fall back to SDPA
        return f"flash-attn does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        q = torch.zeros(4, 1, 64, device="cuda", dtype=torch.bfloat16)  # [tokens, heads, dim]
        cu = torch.tensor([0, 4], device="cuda", dtype=torch.int32)
        out = flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, causal=True)
        torch.cuda.synchronize()
        if out.shape != q.shape:
            return f"flash-attn returned shape {tuple(out.shape)} for {tuple(q.shape)}"
    except Exception as exc:  # noqa: BLE001 -- a kernel that cannot run here: fall back to SDPA
        return f"flash-attn imports but its kernel fails on this GPU ({type(exc).__name__}: {exc})"
    return None


def flash_available() -> bool:
    """True when flash-attn imports and runs on a CUDA device here."""
    return probe_flash() is None


def select_attention(
    flash: FlashMode,
    device: torch.device,
    half: bool = True,
    deterministic: bool = False,
    notes: list[str] | None = None,
) -> AttentionKernel:
    """The kernel for train.flash: 'cuda' demands flash-attn, 'auto' uses it when it can.

    `half`: the model computes in bf16; flash-attn has no fp32 kernels, so fp32 uses SDPA.
    `notes` receives the reason when 'auto' falls back to SDPA on a GPU.
    """
    why_not = probe_flash() if device.type == "cuda" and flash != "none" else "not a CUDA device"
    if flash == "cuda":
        if why_not is not None:
            raise RuntimeError(
                f"train.flash='cuda' needs a CUDA device and a working flash-attn ({why_not}); "
                "build the training env with `make gpu-train-env`, or set train.flash to 'auto' or 'none'"
            )
        if not half:
            raise RuntimeError(
                "train.flash='cuda': flash-attn computes in bf16/fp16 only; set model.dtype "
                "to bf16 (or auto), or train.flash to 'auto' or 'none'"
            )
        return FlashAttention(deterministic)
    if flash == "auto" and device.type == "cuda":
        if why_not is None and half:
            return FlashAttention(deterministic)
        if notes is not None:
            notes.append(f"flash=auto: torch SDPA, because {why_not or 'the model computes in fp32'}")
    return SdpaAttention()


def set_attention(model: torch.nn.Module, kernel: AttentionKernel) -> None:
    """Install `kernel` on a Dragonfly model (before it is wrapped by DDP/FSDP)."""
    model.attention_kernel = kernel
