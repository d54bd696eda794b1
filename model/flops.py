"""Model FLOPs of a training step and the peak FLOP/s that MFU is measured against.

FLOPs follow the usual accounting (PaLM, appendix B): 6 FLOPs per matmul weight per
token for forward + backward, plus attention scores and values, counted per packed
sample (block-diagonal, causal: 6 * dim_head * heads * len^2 per layer for fwd+bwd).
"""

from __future__ import annotations

import torch

from fm9g.model.args import ModelArgs

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A40": 150.0,
    "V100": 125.0,
}


def matmul_params(args: ModelArgs) -> int:
    """Weights that take part in a matmul per token: every linear layer and the LM head."""
    attention = args.dim_model * args.dim_head * (2 * args.num_heads + 2 * args.num_kv_heads)
    ffn = 3 * args.dim_model * args.dim_ff
    return args.num_layers * (attention + ffn) + args.vocab_size * args.dim_model


def step_flops(args: ModelArgs, tokens: int, cu_seqlens: torch.Tensor | None) -> float:
    """FLOPs of forward + backward over `tokens` positions packed as `cu_seqlens` (or one sample)."""
    if cu_seqlens is None:
        square = float(tokens) ** 2
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
        square = float((lengths * lengths).sum())
    attention = 6.0 * args.num_layers * args.num_heads * args.dim_head * square
    return 6.0 * matmul_params(args) * tokens + attention


def peak_flops(device: torch.device, configured_tflops: float | None) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where the figure came from (None: MFU is not reported)."""
    if configured_tflops:
        return configured_tflops * 1e12, f"train.peak_tflops = {configured_tflops:g} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS_BF16.items():
            if key in name:
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
        return None, f"MFU omitted: no peak known for {name!r}; set train.peak_tflops"
    return None, "MFU omitted on CPU: there is no meaningful peak; set train.peak_tflops to report one"
