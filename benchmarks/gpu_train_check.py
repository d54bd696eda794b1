"""A short training run through torchrun and the real trainer, straight and resumed, as one figure line.

    python benchmarks/gpu_train_check.py --backend torch|bmtrain [--steps 20] [--out DIR] [--json FILE]

It builds a corpus from examples/tiny/data (two indexed tasks, a sentencepiece tokenizer),
trains the tiny model for `--steps` steps in one session, then again in two sessions
(checkpoint at half-way, resume), each as `torchrun --nproc-per-node 1 -m fm9g.model.train`,
and reports: the first and last loss, the median tokens/s, and the largest loss difference
between the straight and the resumed run (0 means bit-exact resume).  On a GPU the run uses
bf16 and flash-attn when it works, with train.deterministic on (flash-attn's deterministic
backward), so the resume difference measures what the README claims.  `--device cpu` runs
the same on the CPU (gloo, fp32): the dry mode of benchmarks/gpu_check.sh.  Exit 0 when
the run trained (the last loss below the first) and resumed within `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def build_corpus(root: Path) -> dict[str, Path]:
    """Two indexed tasks and a sentencepiece tokenizer from the tiny example data."""
    from fm9g.data.indexer import build_index
    from fm9g.data.tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    sources = {"en": REPO / "examples/tiny/data/en.jsonl", "zh": REPO / "examples/tiny/data/zh.txt"}
    entries = []
    for task, source in sources.items():
        small = root / f"{task}{source.suffix}"
        small.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
        build_index(small, root / f"{task}_index", language="en" if task == "en" else "zh", durable=False)
        entries.append(
            {"dataset_name": task, "task_name": task, "abs_weight": 0.5, "path": str(root / f"{task}_index")}
        )
    mixture = root / "mixture.json"
    mixture.write_text(json.dumps(entries))
    tokenizer = train_sentencepiece([root / "en.jsonl", root / "zh.txt"], root / "tokenizer.model", 500)
    return {"mixture": mixture, "tokenizer": tokenizer}


def make_run(path: Path, corpus: dict[str, Path], backend: str, steps: int, **train: Any) -> Path:
    """A run directory with a resolved config.yaml, as the orchestrator writes it."""
    from fm9g.rundir import RunDir
    from fm9g.rundir import config as config_mod

    run = RunDir.of(path).make()
    config = config_mod.RunConfig.model_validate(
        {
            "model": {"config": "tiny", "backend": backend},
            "data": {
                "dataset_config": str(corpus["mixture"]),
                "tokenizer_path": str(corpus["tokenizer"]),
                "max_length": 128,
                "dataloader_num_workers": 0,
            },
            "train": {
                "train_iters": steps,
                "save_iters": max(1, steps // 2),
                "batch_size": 4,
                "lr": 0.01,
                "warmup_iters": 2,
                "inspect_iters": 0,
                "seed": 7,
                "deterministic": True,
                **train,
            },
        }
    )
    run.config.write_text(config_mod.dump(config))
    return run.root


def torchrun(run: Path, env: dict[str, str]) -> str:
    """One trainer session of one process; returns its stdout, raises with its output on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    command += ["-m", "fm9g.model.train", "--run-dir", str(run)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"trainer exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def metrics(run: Path) -> dict[int, dict[str, Any]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records}


def set_train(run: Path, **values: Any) -> None:
    import yaml

    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["train"].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))


def check(backend: str, steps: int, out: Path, device: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["FM9G_DEVICE"] = "cpu"
    corpus = build_corpus(out / "corpus")
    straight = make_run(out / f"{backend}-straight", corpus, backend, steps)
    stdout = torchrun(straight, env)
    split = make_run(out / f"{backend}-split", corpus, backend, steps, max_session_steps=max(1, steps // 2))
    torchrun(split, env)
    set_train(split, max_session_steps=0)
    torchrun(split, env)
    a, b = metrics(straight), metrics(split)
    losses = [a[s]["loss"] for s in sorted(a)]
    setup = next((line for line in stdout.splitlines() if "attention" in line and "backend" in line), "")
    return {
        "backend": backend,
        "device": device,
        "steps": len(a),
        "setup": setup.strip(),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "tokens_per_s_median": statistics.median(a[s]["tokens_per_s"] for s in sorted(a)[1:] or sorted(a)),
        "resume_steps": sorted(b) == sorted(a),
        "resume_max_abs_loss_diff": max(abs(a[s]["loss"] - b[s]["loss"]) for s in a if s in b),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "bmtrain"), default="torch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: FM9G_DEVICE=cpu (dry mode)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/out/gpu_train_check")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest loss difference after a resume")
    options = parser.parse_args()
    import torch

    device = "cpu" if options.device == "cpu" or not torch.cuda.is_available() else "cuda"
    result = check(options.backend, options.steps, options.out, device)
    result["ok"] = (
        result["last_loss"] < result["first_loss"]
        and result["resume_steps"]
        and result["resume_max_abs_loss_diff"] <= options.tolerance
    )
    text = json.dumps(result)
    print(text)
    if options.json:
        options.json.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
