"""GPU memory a training layout needs per device, by arithmetic (an estimate, not a measurement).

The big terms are exact byte counts; activations are an estimate.  Per parameter N:
  torch DDP     fp32 weights 4 + fp32 grads 4 + Adam m, v 8 = 16 bytes on every GPU (the
                grads are views into DDP's buckets: gradient_as_bucket_view, no second copy);
  torch FSDP2   the same 16 bytes sharded over the GPUs, plus the bf16 all-gather of the
                layers in flight (two, with prefetch) and of the root's embedding/head;
  bmtrain       bf16 weights 2 + bf16 grads 2 sharded over the GPUs; with offload the fp32
                masters and Adam (12 bytes) live in host memory, without it on the GPUs.
Activations, per token of the step (batch x max_length), bf16 under autocast with the
residual stream in fp32: with train.use_checkpoint each layer keeps its fp32 input (4 d)
and one layer is recomputed at a time; without it each layer keeps about
34 d + 10 ff bytes (norm inputs, q/k/v, attention output, the SwiGLU's three ff-wide
tensors).  The loss adds the logits in bf16, their fp32 copy and its gradient: 10 V bytes.
Fragmentation and the CUDA context (about 1 GiB) come on top.  benchmarks/gpu_mfu.py
reports the measured peak of the 2.4b to hold this against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fm9g.model.args import ModelArgs

Layout = Literal["ddp", "fsdp2", "bmtrain", "bmtrain-offload"]
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one layout, by term; `host` is per GPU's share of host memory."""

    states: float
    gathered: float
    activations: float
    logits: float
    host: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.logits


def parameter_count(args: ModelArgs) -> int:
    """Every parameter of the model (embedding, layers, norms, an untied head)."""
    head = 0 if args.tie_lm_head else args.vocab_size * args.dim_model
    return args.num_layers * layer_count(args) + args.vocab_size * args.dim_model + head + args.dim_model


def layer_count(args: ModelArgs) -> int:
    """Parameters of one transformer layer (attention, the gated MLP, two RMSNorms)."""
    return (
        args.dim_model * args.dim_head * (2 * args.num_heads + 2 * args.num_kv_heads)
        + 3 * args.dim_model * args.dim_ff
        + 2 * args.dim_model
    )


def estimate(args: ModelArgs, layout: Layout, *, gpus: int, tokens: int, checkpoint: bool) -> MemoryEstimate:
    """Per-GPU memory of training `args` with `layout` over `gpus` GPUs on `tokens` tokens per step."""
    n, d, ff = parameter_count(args), args.dim_model, args.dim_ff
    embeddings = args.vocab_size * d * (1 if args.tie_lm_head else 2)
    gathered, host = 0.0, 0.0
    if layout == "ddp":
        states = 16.0 * n
    elif layout == "fsdp2":
        states = 16.0 * n / gpus
        gathered = (2 * layer_count(args) * 2 + embeddings * 2) if gpus > 1 else 0.0
    else:
        states = 4.0 * n / gpus
        gathered = 2 * layer_count(args) * 2
        if layout == "bmtrain-offload":
            host = 12.0 * n / gpus
        else:
            states += 12.0 * n / gpus
    per_layer = (34 * d + 10 * ff) * tokens
    if checkpoint:
        activations = args.num_layers * 4 * d * tokens + per_layer
    else:
        activations = args.num_layers * per_layer
    return MemoryEstimate(states, gathered, activations, 10.0 * args.vocab_size * tokens, host)


def layout_of(backend: str, fsdp: bool, offload: bool) -> Layout:
    """The Layout of a run's model section (model.backend, model.fsdp, bmtrain's offload)."""
    if backend == "bmtrain":
        return "bmtrain-offload" if offload else "bmtrain"
    return "fsdp2" if fsdp else "ddp"


def check_fits(
    args: ModelArgs, layout: Layout, *, gpus: int, tokens: int, checkpoint: bool, device_bytes: int
) -> tuple[str | None, str]:
    """(why this layout cannot fit, or None; a note with the estimate).

    Refuses only what the exact terms already rule out (weights, gradients and optimizer
    states above the device's memory): the activation figure is an estimate, so it only
    goes into the note.
    """
    need = estimate(args, layout, gpus=gpus, tokens=tokens, checkpoint=checkpoint)
    note = (
        f"memory estimate per GPU ({layout}, {gpus} GPUs, {tokens} tokens/step, checkpointing={checkpoint}): "
        f"states {need.states / GIB:.1f} GiB + gathered {need.gathered / GIB:.1f} + activations "
        f"{need.activations / GIB:.1f} + logits {need.logits / GIB:.1f} = {need.total / GIB:.1f} GiB "
        f"of {device_bytes / GIB:.0f} GiB (fm9g.model.memory)"
    )
    if need.states <= device_bytes:
        return None, note
    return (
        f"{layout} needs {need.states / GIB:.0f} GiB per GPU for the weights, gradients and Adam states of "
        f"{parameter_count(args) / 1e9:.2f}B parameters alone, more than this GPU's {device_bytes / GIB:.0f} GiB: "
        "set model.fsdp: true (FSDP2 shards them over every GPU of the run) or model.backend: bmtrain"
    ), note
