"""The sampling options of `fm9g-launch infer`, with nothing to import: the CLI builds
its parser from this without loading the inference code (login nodes are slow)."""

from __future__ import annotations

import argparse

DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 128, "n": 1, "seed": 0}


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--temperature --top-p --max-tokens --n --seed."""
    parser.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                        help=f"sampling temperature, 0 = greedy (default {DEFAULTS['temperature']})")
    parser.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help=f"nucleus sampling mass (default {DEFAULTS['top_p']})")
    parser.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                        help=f"new tokens per completion (default {DEFAULTS['max_tokens']})")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="completions per prompt (default 1)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="sampling seed; prompt i is seeded with seed+i (default 0)")
