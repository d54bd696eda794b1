"""Time to a ready server: `fm9g-launch serve` (render, submit, job start, engine start,
endpoint published, first 200 from /health) against the engine's own bare start (the
same server process started directly, timed to its first 200 from /health), measured
in the same run, alternating, and printed as a ratio.

    python benchmarks/serve_ready.py                        # local executor, a tiny model made here
    python benchmarks/serve_ready.py --executor slurm --repeats 3
    python benchmarks/serve_ready.py --model runs/NAME/hf/STEP

The engine is the one `serve` would pick here (vLLM on a GPU node with vllm, else the
transformers app of fm9g.launchers.serve).  Both sides poll /health
every --poll seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fm9g.launchers.infer import choose_engine
from fm9g.launchers.serve import Serving, vllm_argv
from fm9g.orchestrator.inference.jobs import open_context
from fm9g.orchestrator.inference.serve_stage import ensure_api_key, healthy, serve_stage, stop_serve
from fm9g.orchestrator.inference.stages import resolve_target


def make_model(root: Path) -> Path:
    """A tiny FM9G-2B-shaped model (random weights) with a tokenizer, exported to an HF folder."""
    from fm9g.data.tokenizer import load_tokenizer, train_sentencepiece
    from fm9g.model.args import load_model_config
    from fm9g.model.convert import export_hf
    from fm9g.model.dragonfly import build_model

    texts = ["<用户>你好<AI>你好，我是九格。", "中国的首都是北京。", "the quick brown fox jumps over the lazy dog"] * 30
    tokenizer = load_tokenizer(train_sentencepiece(texts, root / "tokenizer.model", 400))
    args = load_model_config("tiny", vocab_size=tokenizer.vocab_size)
    return export_hf(build_model(args, seed=0).state_dict(), args, root / "tiny-hf", tokenizer)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def bare_start(model: Path, key_file: Path, engine: str, poll: float) -> float:
    """Seconds from starting the engine's server process directly to its first /health 200."""
    host, port = "127.0.0.1", free_port("127.0.0.1")
    env = dict(os.environ)
    if engine == "vllm":
        env["VLLM_API_KEY"] = key_file.read_text().strip()
        # The serve job's own vLLM command line (served name, explicit dtype, no tokenizer mode).
        serving = Serving(
            model=model, name=model.name, key_file=key_file, endpoint=key_file, host=host, port=port, job="bare"
        )
        argv = vllm_argv(serving)
    else:
        # The serve job's own body run directly: no render, no submit, no job start.
        env["FM9G_HOST"] = host
        argv = [
            sys.executable,
            "-m",
            "fm9g.launchers.serve",
            "--model",
            str(model),
            "--api-key-file",
            str(key_file),
            "--endpoint",
            str(key_file.parent / "bare-endpoint.json"),
            "--engine",
            "transformers",
            "--port",
            str(port),
        ]
    started = time.monotonic()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy({"host": host, "port": port}, timeout=1.0):
            if child.poll() is not None:
                raise RuntimeError(f"the bare server exited with {child.returncode} before /health answered")
            time.sleep(poll)
        return time.monotonic() - started
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def orchestrated_start(model: Path, runs: Path, executor: str, engine: str, poll: float) -> float:
    """Seconds from `serve` submitting its job to the first /health 200 of that job's server."""
    target = resolve_target(model, name="serve-ready-bench", run_root=runs)
    ctx = open_context(target.run, target.config, executor, say=lambda message: None)
    ctx.poll_interval = poll
    try:
        started = time.monotonic()
        serve_stage(ctx, model=model, engine=engine)  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        stop_serve(ctx)
        return elapsed
    finally:
        ctx.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model folder (default: a tiny model made in a temp dir)")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between /health polls (both sides)")
    args = parser.parse_args(argv)
    # A shared directory: under Slurm the job on a compute node reads the model and writes the endpoint.
    with tempfile.TemporaryDirectory(prefix="serve-ready-", dir=os.environ.get("FM9G_BENCH_DIR", "/tmp")) as tmp:
        root = Path(tmp)
        model = args.model.resolve() if args.model else make_model(root)
        engine = choose_engine("auto", model)
        runs = root / "runs"
        key_file = resolve_target(model, name="serve-ready-bench", run_root=runs).run.api_key_file
        ensure_api_key(key_file)
        bare, orchestrated = [], []
        for index in range(args.repeats):
            bare.append(bare_start(model, key_file, engine, args.poll))
            orchestrated.append(orchestrated_start(model, runs, args.executor, engine, args.poll))
            print(
                f"  round {index + 1}: bare {bare[-1]:.2f}s  fm9g-launch serve ({args.executor}) {orchestrated[-1]:.2f}s",
                flush=True,
            )
    b, o = statistics.median(bare), statistics.median(orchestrated)
    print(f"engine {engine}, model {model.name}, {args.repeats} rounds, /health polled every {args.poll:g}s")
    print(f"bare engine start to /health (median):           {b:.2f}s")
    print(f"fm9g-launch serve submission to /health (median): {o:.2f}s  [{args.executor} executor]")
    print(f"ratio serve/bare: {o / b:.2f}x  (overhead {o - b:+.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
