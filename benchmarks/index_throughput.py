"""Benchmark: jsonl → index throughput (MB/s) against reading + json-parsing the same file.

Generates a jsonl file of mixed Chinese / English / code samples (pretraining lines
and instruction pairs, lengths from ~100 B to ~20 KB) in a temporary directory,
then, in interleaved rounds, measures:

  reference   `for line in open(f, "rb"): json.loads(line)`, one pass, one process
              (what the original convert_json2index.py costs before it writes anything)
  index P=1   build_index(..., processes=1) in the default estimate mode
  index P=2   build_index(..., processes=2)

and prints the best of the rounds for each, the per-process ratio against the
reference and the 2-process scaling, next to the machine's own ceiling for two
processes (a pure-CPU job run in 1 and 2 processes in the same rounds). Both default (durable: fsync before the
rename) and durable=False builds are shown. Tokenizer-mode throughput (a sentencepiece
model trained on the data) is reported separately. Wall-clock figures depend on what
else runs on the machine; the load average is printed with them.

    python benchmarks/index_throughput.py               # 256 MB
    python benchmarks/index_throughput.py --size-mb 20  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from fm9g.data.indexer import build_index
from fm9g.data.tokenizer import train_sentencepiece

ZH = "中国的首都是北京。今天天气很好，我们去公园散步吧！人工智能正在改变世界，大模型训练需要大量高质量的数据。"
EN = "the quick brown fox jumps over the lazy dog while large language models learn from billions of tokens".split()
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
    "import numpy as np\narr = np.zeros((3, 4))\n",
    'if __name__ == "__main__":\n    main()\r\n',
]


def _text(rng: random.Random, size: int) -> str:
    kind = rng.random()
    if kind < 0.5:
        return "".join(rng.choice(ZH) for _ in range(size // 3))
    if kind < 0.85:
        return " ".join(rng.choice(EN) for _ in range(size // 6))
    return "".join(rng.choice(CODE) for _ in range(max(1, size // 40)))


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write about size_mb MB of jsonl; return its byte size."""
    rng = random.Random(seed)
    pool = []
    for i in range(3000):
        size = int(min(20000, max(100, rng.lognormvariate(6.5, 1.0))))
        if i % 5 == 0:
            row = {"input": "<用户>" + _text(rng, size // 4), "output": _text(rng, size), "source": "bench"}
        else:
            row = {"input": "", "output": _text(rng, size)}
        pool.append(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    target = int(size_mb * 1e6)
    written = 0
    with open(path, "wb") as handle:
        while written < target:
            chunk = b"".join(rng.choices(pool, k=256))
            handle.write(chunk)
            written += len(chunk)
    return written


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def reference(path: Path) -> tuple[float, float]:
    """(wall, cpu) seconds of one read + json.loads pass."""
    cpu, start = _cpu(), time.perf_counter()
    with open(path, "rb") as handle:
        for line in handle:
            json.loads(line)
    return time.perf_counter() - start, _cpu() - cpu


def _burn(count: int) -> int:
    total = 0
    for i in range(count):
        total += i * i
    return total


def machine_scaling(count: int = 4_000_000) -> float:
    """How much faster this machine runs two CPU-bound processes than one doing both jobs.

    On a quiet machine with two free cores this is about 2; shared or throttled cores
    give less, and no program can scale better than this here.
    """
    import multiprocessing as mp

    start = time.perf_counter()
    _burn(count)
    _burn(count)
    serial = time.perf_counter() - start
    ctx = mp.get_context("fork")
    start = time.perf_counter()
    workers = [ctx.Process(target=_burn, args=(count,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return serial / (time.perf_counter() - start)


def index_once(
    path: Path, out: Path, processes: int, durable: bool, tokenizer: Path | None = None
) -> tuple[float, float]:
    """(wall, cpu) seconds of one build_index into a fresh output directory."""
    shutil.rmtree(out, ignore_errors=True)
    cpu, start = _cpu(), time.perf_counter()
    build_index(path, out, processes=processes, durable=durable, tokenizer=tokenizer)
    wall, used = time.perf_counter() - start, _cpu() - cpu
    shutil.rmtree(out, ignore_errors=True)  # not timed
    return wall, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=256.0, help="size of the generated jsonl (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is shown")
    parser.add_argument("--tokenizer-mb", type=float, default=16.0, help="slice indexed in tokenizer mode")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary files go (default: system temp)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fm9g-index-bench-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "corpus.jsonl"
        size = make_corpus(data, args.size_mb)
        mb = size / 1e6
        print(f"corpus: {mb:.1f} MB, {sum(1 for _ in open(data, 'rb'))} lines; cpus={os.cpu_count()}")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        configs = [
            ("reference json.loads", 0, True),
            ("index P=1", 1, True),
            ("index P=2", 2, True),
            ("index P=1 durable=False", 1, False),
            ("index P=2 durable=False", 2, False),
        ]
        best: dict[str, tuple[float, float]] = {}
        ceiling = 0.0
        for _ in range(args.rounds):
            ceiling = max(ceiling, machine_scaling())
            for name, processes, durable in configs:
                wall, cpu = reference(data) if processes == 0 else index_once(data, tmp / "out", processes, durable)
                old = best.get(name)
                best[name] = (min(wall, old[0]), min(cpu, old[1])) if old else (wall, cpu)
        print(f"load average after:  {os.getloadavg()[0]:.2f}")
        ref_wall, ref_cpu = best["reference json.loads"]
        print(f"\n{'run':<26}{'wall MB/s':>10}{'MB/cpu-s':>10}{'per-proc/ref':>14}")
        for name, processes, _ in configs:
            wall, cpu = best[name]
            per_proc = (mb / wall / max(1, processes)) / (mb / ref_wall)
            print(f"{name:<26}{mb / wall:>10.1f}{mb / cpu:>10.1f}{per_proc:>13.2f}x")
        print(f"machine ceiling (pure-CPU work, 2 processes vs 1): {ceiling:.2f}x")
        for suffix in ("", " durable=False"):
            one, two = best[f"index P=1{suffix}"][0], best[f"index P=2{suffix}"][0]
            print(
                f"2-process scaling{suffix or ' (default, durable)'}: {one / two:.2f}x ({one / two / ceiling:.0%} of the machine ceiling)"
            )

        # tokenizer mode, on a slice
        slice_path = tmp / "slice.jsonl"
        with open(data, "rb") as src, open(slice_path, "wb") as dst:
            dst.write(src.read(int(args.tokenizer_mb * 1e6)))
            dst.write(src.readline())
        sample = [json.loads(line)["output"] for _, line in zip(range(2000), open(slice_path, "rb"))]
        model = train_sentencepiece(sample, tmp / "tokenizer.model", 4000)
        slice_mb = slice_path.stat().st_size / 1e6
        wall, cpu = index_once(slice_path, tmp / "out", 1, True, tokenizer=model)
        print(
            f"\ntokenizer mode (sentencepiece, P=1, {slice_mb:.1f} MB): {slice_mb / wall:.1f} MB/s wall, "
            f"{slice_mb / cpu:.1f} MB/cpu-s ({slice_mb / wall / (mb / ref_wall):.2f}x the json.loads reference)"
        )


if __name__ == "__main__":
    main()
