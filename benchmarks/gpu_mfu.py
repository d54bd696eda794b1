"""MFU of FM9G training steps on one GPU: the 2B model, bf16, flash-attn when installed.

    python benchmarks/gpu_mfu.py [--config 2.4b --seq 4096 --batch 1 --docs 4 --steps 10 --checkpoint] [--json FILE]

One step is what the trainer does on one rank: forward over a packed batch (`--docs`
documents per sequence, block-diagonal causal attention), cross-entropy, backward,
gradient clipping and the muP AdamW step.  The figure is MFU = model FLOPs per second /
the data-sheet bf16 peak (`fm9g.model.flops`), and, as a same-run reference that holds on
any card, the step's TFLOP/s as a ratio of an 8192^3 bf16 matmul timed in the same process.
Needs a CUDA GPU; it exits with a message elsewhere, except with `--dry`, which runs the
same code on the CPU (tiny model, fp32, SDPA, no timing figures) for gpu_check.sh's dry mode.
Activation checkpointing is switched on by itself on GPUs under 100 GiB: the 2.4b at 4096
tokens peaks at about 80-87 GB without it (weights, grads and Adam 44 GB + activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fm9g.model.args import load_model_config
from fm9g.model.attention import cu_seqlens_from_segments, probe_flash, select_attention, set_attention
from fm9g.model.dragonfly import build_model
from fm9g.model.flops import peak_flops, step_flops
from fm9g.model.optim import build_optimizer


def matmul_tflops(reps: int = 10) -> float:
    """Achieved bf16 TFLOP/s of a large square matmul: what this card reaches in practice."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * reps / (time.perf_counter() - started) / 1e12


def packed_batch(batch: int, seq: int, docs: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens packed as `docs` equal documents per row, like the PackedLoader's output."""
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    doc_len = seq // docs
    segments = (torch.arange(seq, device=device) // doc_len).clamp(max=docs - 1).expand(batch, seq)
    positions = torch.arange(seq, device=device) - segments[0] * doc_len
    cu_seqlens, max_seqlen = cu_seqlens_from_segments(segments)
    return {
        "ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": positions.expand(batch, seq),
        "segments": segments,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": max_seqlen,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="2.4b", help="model config name or JSON path (default 2.4b)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per packed sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--docs", type=int, default=4, help="documents packed into each sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument(
        "--checkpoint",
        choices=("auto", "on", "off"),
        default="auto",
        help="activation checkpointing (train.use_checkpoint); auto: on for GPUs under 100 GiB",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here as one JSON object")
    parser.add_argument("--dry", action="store_true", help="run the code path on the CPU (tiny model), no figures")
    options = parser.parse_args()
    if options.dry:
        options.config, options.seq, options.steps = "tiny", 64, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_mfu: no CUDA GPU here; run it where one is (or --dry)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    checkpoint = options.checkpoint == "on" or (options.checkpoint == "auto" and 0 < memory < 100 * 2**30)

    args = load_model_config(options.config, **({"vocab_size": 500} if options.dry else {}))
    model = build_model(args, device, seed=0)
    model.encoder.checkpoint_layers = checkpoint
    half = device.type == "cuda"
    kernel = select_attention("auto", device, half=half)
    set_attention(model, kernel)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, scale_width=args.scale_width)
    batch = packed_batch(options.batch, options.seq, options.docs, args.vocab_size, device)
    flops = step_flops(args, options.batch * options.seq, batch["cu_seqlens"].cpu())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if half else torch.autocast("cpu", enabled=False)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(
                batch["ids"], batch["positions"], batch["segments"], batch["cu_seqlens"], batch["max_seqlen"]
            )
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    if options.dry:
        loss = step()
        print(f"gpu_mfu --dry: one step of {options.config} on the CPU, loss {loss:.3f}, flash: {probe_flash()}")
        return 0
    for _ in range(3):
        step()
    times = []
    for _ in range(options.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    reference = matmul_tflops()
    peak, peak_note = peak_flops(device, None)
    figures = {
        "gpu": torch.cuda.get_device_name(),
        "config": options.config,
        "tokens_per_step": options.batch * options.seq,
        "docs_per_row": options.docs,
        "attention": type(kernel).__name__,
        "flash_probe": probe_flash() or "ok",
        "checkpointing": checkpoint,
        "step_ms": seconds * 1e3,
        "tokens_per_s": options.batch * options.seq / seconds,
        "tflops": achieved,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "matmul_tflops": reference,
        "ratio_to_matmul": achieved / reference,
        "mfu": achieved * 1e12 / peak if peak else None,
        "peak_note": peak_note,
    }
    print(
        f"{figures['gpu']}: {options.config}, {options.batch}x{options.seq} tokens "
        f"({options.docs} docs/row), attention {figures['attention']} (flash probe: {figures['flash_probe']}), "
        f"checkpointing={checkpoint}"
    )
    print(
        f"step {seconds * 1e3:.1f} ms (median of {options.steps}), {figures['tokens_per_s']:,.0f} "
        f"tokens/s, {achieved:.1f} TFLOP/s, peak memory {figures['peak_memory_gib']:.1f} GiB"
    )
    print(f"step TFLOP/s / bf16 matmul TFLOP/s in this run ({reference:.0f}): {achieved / reference:.3f}")
    print(f"MFU: {figures['mfu']:.3f} ({peak_note})" if peak else peak_note)
    if options.json:
        options.json.write_text(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
