"""The body of a serve job (node side), what templates/serve.sbatch.j2 runs:

    python -m fm9g.orchestrator.inference.serve_node --model HF_DIR --endpoint FILE --api-key-file FILE
        [--engine auto|vllm|transformers] [--port P]

It picks the engine (vLLM on a GPU node that has it, else transformers serve's app, see
hf_server.py), binds the port (0: any free one), publishes {host, port, url, job_id,
engine, model, pid} to the endpoint file atomically, serves until SIGTERM (scancel, or
the USR1 Slurm sends before the walltime), and removes the endpoint if it still names
this job.  Readiness is not announced here: clients poll /health.

The API key is read from its file by this process and handed to vLLM through the
VLLM_API_KEY environment variable, so it is in neither the script nor the command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fm9g.rundir.atomic import read_json, write_json
from fm9g.orchestrator.inference.errors import InferenceError


def node_address() -> str:
    """The address clients reach this node at: FM9G_HOST (the local executor sets 127.0.0.1),
    else what the node's hostname resolves to (its cluster address, as torchrun uses)."""
    explicit = os.environ.get("FM9G_HOST")
    if explicit:
        return explicit
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def job_id() -> str:
    return os.environ.get("FM9G_JOB_ID") or os.environ.get("SLURM_JOB_ID") or str(os.getpid())


def publish(path: Path, *, host: str, port: int, engine: str, model: Path, job: str) -> dict[str, Any]:
    """Write the endpoint file atomically (another process reads it)."""
    endpoint = {"host": host, "port": port, "url": f"http://{host}:{port}/v1", "job_id": job, "engine": engine,
                "model": str(model), "hostname": socket.gethostname(), "pid": os.getpid(), "published_at": time.time()}
    write_json(path, endpoint)
    return endpoint


def unpublish(path: Path, job: str) -> None:
    """Remove the endpoint file if it is still ours (a newer job may own it by now)."""
    current = read_json(path)
    if current is not None and str(current.get("job_id")) == job:
        path.unlink(missing_ok=True)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serve_transformers(model: Path, key_file: Path, endpoint: Path, host: str, port: int, job: str) -> int:
    from fm9g.orchestrator.inference import hf_server

    sock = hf_server.bind(host, port)
    publish(endpoint, host=host, port=sock.getsockname()[1], engine="transformers", model=model, job=job)
    # Slurm's USR1 before the walltime (--signal=B:USR1@lead) becomes uvicorn's graceful SIGTERM;
    # a SIGTERM while the model still loads (before uvicorn's own handlers) still unpublishes.
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        hf_server.serve(model, hf_server.read_api_key(key_file), sock)
    finally:
        unpublish(endpoint, job)
    return 0


def serve_vllm(model: Path, key_file: Path, endpoint: Path, host: str, port: int, job: str) -> int:
    from fm9g.orchestrator.inference.engines import tokenizer_mode
    from fm9g.orchestrator.inference.hf_server import read_api_key

    port = port or free_port(host)
    env = {**os.environ, "VLLM_API_KEY": read_api_key(key_file)}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
            "--port", str(port), "--dtype", "auto", "--tokenizer-mode", tokenizer_mode(model)]
    child = subprocess.Popen(argv, env=env)
    publish(endpoint, host=host, port=port, engine="vllm", model=model, job=job)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    try:
        return child.wait()
    finally:
        unpublish(endpoint, job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm9g.orchestrator.inference.serve_node",
                                     description="Run an OpenAI-compatible server for one model and publish its endpoint.")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--endpoint", type=Path, required=True, help="endpoint.json to publish")
    parser.add_argument("--api-key-file", type=Path, required=True)
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = parser.parse_args(argv)
    from fm9g.orchestrator.inference.engines import check_model_dir, choose_engine

    try:
        check_model_dir(args.model)
        engine = choose_engine(args.engine)
    except InferenceError as exc:
        print(f"serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    host, job = node_address(), job_id()
    print(f"serve: engine {engine}, model {args.model}, job {job}, host {host}", flush=True)
    runner = serve_vllm if engine == "vllm" else serve_transformers
    return runner(args.model, args.api_key_file, args.endpoint, host, args.port, job)


if __name__ == "__main__":
    sys.exit(main())
