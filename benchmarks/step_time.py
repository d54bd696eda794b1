"""Training-step time of our Dragonfly vs transformers' GraniteForCausalLM of the same shape.

    .venv/bin/python benchmarks/step_time.py [--layers 4 --dim 256 --seq 256 --batch 4 --reps 15]

Both models get the same weights (our checkpoint exported with `fm9g.model.hf`), the same
batch, the same loss (mean token cross-entropy on pre-shifted targets) and the same
AdamW.  One repetition = forward + backward + optimizer step.  Repetitions alternate
between the two models (ours, theirs, ours, ...) after warm-up so drift in machine load
hits both alike; the figure is the ratio of the medians, ours / theirs (< 1 = faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fm9g.model.args import load_model_config
from fm9g.model.dragonfly import build_model
from fm9g.model.hf import to_hf


def make_models(args_overrides: dict) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """Our model and a GraniteForCausalLM with identical weights."""
    from transformers import GraniteConfig, GraniteForCausalLM

    args = load_model_config("2.4b", **args_overrides)  # 2.4b's ratios and muP settings, shrunk
    ours = build_model(args, seed=0)
    tensors, config = to_hf(ours.state_dict(), args)
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    theirs = GraniteForCausalLM(GraniteConfig(**config, attn_implementation="sdpa"))
    missing, unexpected = theirs.load_state_dict(tensors, strict=False)
    assert not unexpected and all("lm_head" in key for key in missing), (missing, unexpected)
    theirs.tie_weights()
    return ours, theirs, args


def step_fn(model: torch.nn.Module, hf: bool, ids: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids).logits if hf else model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256, help="hidden size (heads of 64, ffn 2.5x, like 2.4b)")
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps timings steady on a shared machine (0: torch default)",
    )
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    heads = options.dim // 64
    ours, theirs, _ = make_models(
        {
            "dim_model": options.dim,
            "num_heads": heads,
            "num_kv_heads": heads,
            "dim_head": 64,
            "dim_ff": options.dim * 5 // 2,
            "num_layers": options.layers,
            "vocab_size": options.vocab,
            "dim_model_base": options.dim // 4,
        }
    )
    ids = torch.randint(0, options.vocab, (options.batch, options.seq))
    targets = torch.roll(ids, -1, dims=1)
    with torch.no_grad():  # same weights, same function: the comparison is like for like
        gap = (ours(ids) - theirs(ids).logits).abs().max().item()
    steps = {"ours": step_fn(ours, False, ids, targets), "theirs": step_fn(theirs, True, ids, targets)}
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for rep in range(options.warmup + options.reps):
        order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
        for name in order:
            started = time.perf_counter()
            steps[name]()
            if rep >= options.warmup:
                times[name].append(time.perf_counter() - started)
    ours_ms, theirs_ms = (statistics.median(times[k]) * 1e3 for k in ("ours", "theirs"))
    print(
        f"shape: layers={options.layers} dim={options.dim} heads={heads} ffn={options.dim * 5 // 2} "
        f"vocab={options.vocab} batch={options.batch}x{options.seq}, threads={torch.get_num_threads()}, "
        f"max |logit diff| before training={gap:.2e}"
    )
    print(
        f"median step (fwd+bwd+AdamW) over {options.reps} interleaved reps: ours {ours_ms:.1f} ms, "
        f"GraniteForCausalLM {theirs_ms:.1f} ms"
    )
    print(f"ratio ours/theirs = {ours_ms / theirs_ms:.3f}")


if __name__ == "__main__":
    main()
