"""Model FLOPs of a training step and the peak FLOP/s that MFU is measured against.

FLOPs: 6 FLOPs per matmul weight per token for forward + backward (the LM head counted,
the embedding lookup not), plus attention scores and values counted per packed sample
with causal masking halving the work: 6 * dim_head * heads * len^2 per layer for
fwd+bwd.  That is the FlashAttention paper's convention; PaLM (appendix B), Megatron and
torchtitan count 12 * layers * heads * dim_head * len per token (no causal halving), so
their MFU reads higher than this one for the same run.
"""

from __future__ import annotations

import torch

from fm9g.model.args import ModelArgs

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, as
# (substring of torch.cuda.get_device_name, TFLOP/s), most specific first: the first
# substring found in the name wins, so "H100 PCIe" must come before "H100" and "H200"
# before "H20".  PCIe and NVL parts run at lower clocks and power than SXM: H100 PCIe 756,
# H100 NVL 835, H200 NVL 835 (NVIDIA data sheets).  V100 is absent on purpose: it has no
# bf16 tensor cores (its 125 TFLOP/s is fp16), and neither flash-attn 2 nor BMTrain's bf16
# path runs on it; set train.peak_tflops to report an MFU against fp16 anyway.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H800 PCIe", 756.0),
    ("H200", 989.0),  # SXM (and GH200)
    ("H100", 989.0),  # SXM, "H100 80GB HBM3"
    ("H800", 989.0),  # SXM
    ("H20", 148.0),
    ("A100", 312.0),  # SXM and PCIe share the dense bf16 peak
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A40", 149.7),
)


def peak_tflops_of(name: str) -> float | None:
    """Dense bf16 peak of the GPU called `name` (torch.cuda.get_device_name), or None when unknown."""
    for key, tflops in PEAK_TFLOPS_BF16:
        if key.lower() in name.lower():
            return tflops
    return None


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
        tflops = peak_tflops_of(name)
        if tflops is not None:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16"
        return None, f"MFU omitted: no bf16 peak known for {name!r}; set train.peak_tflops"
    return None, "MFU omitted on CPU: there is no meaningful peak; set train.peak_tflops to report one"
