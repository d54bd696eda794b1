"""The FM9G "dragonfly" decoder (cpm_dragonfly), one file, read top to bottom.

Pre-RMSNorm transformer with GQA attention and rotate-half RoPE, a SwiGLU FFN, and the
optional muP scalings of MiniCPM/FM9G-2B: embeddings x scale_emb, every residual
branch x scale_depth/sqrt(num_layers), logits from hidden / (dim_model/dim_model_base).
With `scale` off, no scale_depth and an untied head the same file is the Llama-style
FM9G-8B.  Module and parameter names equal the FM9G checkpoint keys
(`encoder.layers.{i}.self_att.self_attention.project_q.weight`, ...), so loading an
FM9G `.pt` is a plain `load_state_dict`, and HF export is a key map (`hf.py`).

The attention kernel (SDPA or flash-attn) is installed from outside (`attention.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fm9g.model.args import ModelArgs
from fm9g.model.attention import AttentionContext, AttentionKernel, SdpaAttention


class RMSNorm(nn.Module):
    """Root-mean-square norm; statistics in fp32 so bf16 activations do not lose range."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(position_ids: torch.Tensor, dim_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, L, 1, D] in fp32 for rotate-half RoPE at the given positions [B, L]."""
    # Computed per forward instead of cached: a fp32 buffer would be cast by model.to(bf16),
    # and the table is tiny next to one matmul.
    exponent = torch.arange(0, dim_head, 2, device=position_ids.device, dtype=torch.float32) / dim_head
    inv_freq = 1.0 / (base**exponent)  # [D/2]
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [B, L, 1, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by the angles; done in fp32, returned in x's dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention: bias-free q/k/v/out projections around the installed kernel."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.dim_head = args.num_heads, args.num_kv_heads, args.dim_head
        self.dropout_p = args.dropout_p
        self.project_q = nn.Linear(args.dim_model, args.num_heads * args.dim_head, bias=False)
        self.project_k = nn.Linear(args.dim_model, args.num_kv_heads * args.dim_head, bias=False)
        self.project_v = nn.Linear(args.dim_model, args.num_kv_heads * args.dim_head, bias=False)
        self.attention_out = nn.Linear(args.num_heads * args.dim_head, args.dim_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionContext) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.project_q(x).view(batch, length, self.num_heads, self.dim_head)  # [B, L, H, D]
        k = self.project_k(x).view(batch, length, self.num_kv_heads, self.dim_head)  # [B, L, Hkv, D]
        v = self.project_v(x).view(batch, length, self.num_kv_heads, self.dim_head)  # [B, L, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, self.dropout_p if self.training else 0.0)  # [B, L, H*D]
        return self.attention_out(out)


class SelfAttentionBlock(nn.Module):
    """Pre-norm attention with the (optionally muP-scaled) residual add."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.residual_scale = args.residual_scale
        self.layernorm_before_attention = RMSNorm(args.dim_model, args.eps)
        self.self_attention = Attention(args)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionContext) -> torch.Tensor:
        branch = self.self_attention(self.layernorm_before_attention(h), cos, sin, attend)
        return h + branch * self.residual_scale if self.residual_scale != 1.0 else h + branch


class GatedInput(nn.Module):
    """The two input projections of the gated FFN: w_0 (gate, through silu) and w_1 (up)."""

    def __init__(self, dim_model: int, dim_ff: int) -> None:
        super().__init__()
        self.w_0 = nn.Linear(dim_model, dim_ff, bias=False)
        self.w_1 = nn.Linear(dim_model, dim_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.w_0(x)) * self.w_1(x)


class FeedForward(nn.Module):
    """SwiGLU: w_out(silu(w_0 x) * w_1 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w_in = GatedInput(args.dim_model, args.dim_ff)
        self.w_out = nn.Linear(args.dim_ff, args.dim_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.w_in(x))


class FFNBlock(nn.Module):
    """Pre-norm FFN with the (optionally muP-scaled) residual add."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.residual_scale = args.residual_scale
        self.layernorm_before_ffn = RMSNorm(args.dim_model, args.eps)
        self.ffn = FeedForward(args)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        branch = self.ffn(self.layernorm_before_ffn(h))
        return h + branch * self.residual_scale if self.residual_scale != 1.0 else h + branch


class TransformerBlock(nn.Module):
    """One layer: attention block then FFN block."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_att = SelfAttentionBlock(args)
        self.ffn = FFNBlock(args)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionContext) -> torch.Tensor:
        return self.ffn(self.self_att(h, cos, sin, attend))


class Encoder(nn.Module):
    """The layer stack and the final norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.num_layers))
        self.output_layernorm = RMSNorm(args.dim_model, args.eps)
        # Set by the trainer (train.use_checkpoint): recompute each layer in backward.
        self.checkpoint_layers = False

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionContext) -> torch.Tensor:
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, attend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attend)
        return self.output_layernorm(h)


class Dragonfly(nn.Module):
    """FM9G causal LM: token ids [B, L] -> logits [B, L, vocab]."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.input_embedding = nn.Embedding(args.vocab_size, args.dim_model)
        self.encoder = Encoder(args)
        # The FM9G-2B head reuses the input embedding; the 8B has its own `lm_head`.
        self.lm_head = None if args.tie_lm_head else nn.Linear(args.dim_model, args.vocab_size, bias=False)
        self.attention_kernel: AttentionKernel = SdpaAttention()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """FM9G init: matrices ~ N(0, init_std/sqrt(scale_width)), embeddings ~ N(0, init_std), norms 1."""
        std = self.args.init_std
        for name, param in self.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0)
            elif name in ("input_embedding.weight", "lm_head.weight"):
                param.normal_(0.0, std, generator=generator)
            else:
                param.normal_(0.0, std / self.args.scale_width**0.5, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Logits for every position; packed samples are kept apart by segment_ids/cu_seqlens."""
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)  # [B, L]
        attend = self.attention_kernel.prepare(segment_ids, cu_seqlens, max_seqlen, (batch, length))
        cos, sin = rotary_tables(position_ids, self.args.dim_head, self.args.base)
        h = self.input_embedding(input_ids)  # [B, L, dim_model]
        if self.args.embedding_scale != 1.0:
            h = h * self.args.embedding_scale
        h = self.encoder(h, cos, sin, attend)
        if self.args.scale_width != 1.0:
            h = h / self.args.scale_width  # muP: the same as dividing the logits, on a smaller tensor
        weight = self.input_embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)  # [B, L, vocab]


def count_parameters(model: nn.Module, embeddings: bool = True) -> int:
    """Parameter count; `embeddings=False` leaves out the input embedding and an untied head."""
    skip = set() if embeddings else {"input_embedding.weight", "lm_head.weight"}
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


def build_model(args: ModelArgs, device: torch.device | str = "cpu", seed: int | None = None) -> Dragonfly:
    """A Dragonfly on `device`, initialised (skipped on the meta device) from `seed`."""
    with torch.device(device):
        model = Dragonfly(args)
    if torch.device(device).type != "meta":
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    return model
