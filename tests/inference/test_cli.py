"""The new subcommands parse, and building the parser imports neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys

from fm9g.orchestrator.cli import build_parser


def test_help_stays_light() -> None:
    code = (
        "import sys; from fm9g.orchestrator.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_options() -> None:
    parser = build_parser()
    infer = parser.parse_args(
        [
            "infer",
            "runs/x",
            "--prompts",
            "p.jsonl",
            "--output",
            "o.jsonl",
            "--temperature",
            "0",
            "--top-p",
            "0.5",
            "--max-tokens",
            "9",
            "--n",
            "2",
            "--seed",
            "3",
            "--no-chat",
        ]
    )
    assert (infer.temperature, infer.top_p, infer.max_tokens, infer.n, infer.seed, infer.chat) == (
        0.0,
        0.5,
        9,
        2,
        3,
        False,
    )
    assert infer.executor is None and infer.engine == "auto"
    serve = parser.parse_args(["serve", "runs/x", "--executor", "slurm", "--port", "8000", "--stop"])
    assert (serve.executor, serve.port, serve.stop, serve.wait) == ("slurm", 8000, True, True)
    convert = parser.parse_args(["convert", "runs/x", "--step", "60", "--output", "hf"])
    assert convert.step == 60 and str(convert.output) == "hf"
