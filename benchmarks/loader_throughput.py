"""Benchmark: packed tokens per second per core of PackedLoader on a tiny config.

Builds a small mixed corpus (Chinese, English, code; pretraining lines and
instruction pairs) as two indexed tasks plus a sentencepiece tokenizer trained on it,
all in a temporary directory, then iterates PackedLoader(max_length=128,
batch_size=4) and reports real (non-padding) tokens per second, per wall second and
per CPU second of the main process. The reference is the bare tokenizer on the same
lines (tokens/s of `encode` alone): the ratio shows what reading, transforms,
sampling and packing add on top of tokenization.

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --batches 200 --lines 2000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from fm9g.data.indexer import build_index
from fm9g.data.loader import PackedLoader
from fm9g.data.mixture import load_mixture
from fm9g.data.tokenizer import load_tokenizer, train_sentencepiece

ZH = "中国的首都是北京。今天天气很好，我们去公园散步吧！人工智能正在改变世界，大模型训练需要大量高质量的数据。"
EN = "the quick brown fox jumps over the lazy dog while large language models learn from billions of tokens".split()


def _text(rng: random.Random, size: int) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(ZH) for _ in range(size))
    return " ".join(rng.choice(EN) for _ in range(size // 2))


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=20000, help="lines per task")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, nargs="*", default=[0], help="worker counts to measure")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="fm9g-loader-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lm = [{"input": "", "output": _text(rng, rng.randint(10, 300))} for _ in range(args.lines)]
        qa = [
            {"input": _text(rng, rng.randint(5, 40)), "output": _text(rng, rng.randint(5, 120))}
            for _ in range(args.lines)
        ]
        entries = []
        for name, rows in (("lm", lm), ("qa", qa)):
            raw = tmp / f"{name}.jsonl"
            raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            build_index(raw, tmp / name)
            entries.append({"dataset_name": name, "task_name": name, "abs_weight": 0.5, "path": str(tmp / name)})
        model = train_sentencepiece([r["output"] for r in lm[:3000]], tmp / "tokenizer.model", 2000)
        tokenizer = load_tokenizer(model)
        mixture = load_mixture(entries, base_dir=tmp)

        texts = [r["output"] for r in lm[:5000]] + [r["input"] + r["output"] for r in qa[:5000]]
        cpu, start = _cpu(), time.perf_counter()
        ref_tokens = sum(len(tokenizer.encode(t)) for t in texts)
        ref_wall, ref_cpu = time.perf_counter() - start, _cpu() - cpu
        print(
            f"reference: tokenizer.encode alone  {ref_tokens / ref_wall:>10.0f} tokens/s  {ref_tokens / ref_cpu:>10.0f} tokens/cpu-s"
        )

        for workers in args.num_workers:
            loader = PackedLoader(
                mixture, tokenizer, batch_size=args.batch_size, max_length=args.max_length, num_workers=workers
            )
            next(loader)  # start-up (workers, first reads) is not timed
            tokens = 0
            cpu, start = _cpu(), time.perf_counter()
            for _ in range(args.batches):
                tokens += next(loader)["num_tokens"]
            wall, used = time.perf_counter() - start, _cpu() - cpu
            loader.close()
            fill = tokens / (args.batches * args.batch_size * args.max_length)
            line = f"PackedLoader num_workers={workers}: {tokens / wall:>10.0f} tokens/s wall, row fill {fill:.1%}"
            if workers == 0:
                # everything runs in this process: this is the per-core figure
                line += f", {tokens / used:>10.0f} tokens/cpu-s = {tokens / used / (ref_tokens / ref_cpu):.2f}x the bare tokenizer"
            print(line)


if __name__ == "__main__":
    main()
