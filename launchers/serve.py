"""The body of a serve job (node side), what templates/serve.sbatch.j2 runs:

    python -m fm9g.launchers.serve --model HF_DIR --endpoint FILE --api-key-file FILE
        [--engine auto|vllm|transformers] [--port P]

It picks the engine (vLLM on a GPU node that has it, else transformers serve's app, see
below), binds the port (0: any free one), publishes {host, port, url, job_id, engine,
model, pid} to the endpoint file atomically, serves until SIGTERM (scancel, or the USR1
Slurm sends before the walltime), and removes the endpoint if it still names this job.
Readiness is not announced here: clients poll /health.

The API key is read from its file by this process and handed to vLLM through the
VLLM_API_KEY environment variable, so it is in neither the script nor the command line.

The CPU engine is `transformers serve`'s own OpenAI-compatible FastAPI app
(/v1/completions, /v1/chat/completions with streaming, /v1/models, /health), pinned to
one model folder, behind an API-key gate, on a socket we bind ourselves.  Why not the
`transformers serve` command as is: it has no API key option, it exposes /load_model and
/reset (load any model, drop the pinned one), and it cannot report the port of
`--port 0`.  So `build_app` builds the same app through the command's own class
(`transformers.cli.serve.Serve` with the server start left out), `ApiKeyGate` wraps it
and uvicorn runs it on a socket already bound.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fm9g.launchers.infer import check_model_dir, choose_engine, tokenizer_mode
from fm9g.launchers.prompts import InferenceError
from fm9g.rundir.atomic import read_json, write_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})  # readiness probes carry no key (as vLLM's)
BLOCKED_PATHS = frozenset({"/load_model", "/reset"})  # would let a caller swap the pinned model


class ApiKeyGate:
    """ASGI middleware: every HTTP request but /health needs `Authorization: Bearer KEY`
    (the scheme in any case: auth schemes are case-insensitive, RFC 7235 section 2.1)."""

    def __init__(self, app: App, api_key: str) -> None:
        if not api_key:
            raise ValueError("an empty API key would let every request in")
        self.app = app
        self.expected = api_key.encode()

    def authorized(self, header: bytes) -> bool:
        """True when an Authorization header value is `Bearer` (any case) and the key."""
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken does not tell how much of a wrong key was right.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan events pass through
            return
        path = scope.get("path", "")
        if path in BLOCKED_PATHS:
            await _json(send, 404, {"error": {"message": f"{path} is disabled on this server", "type": "not_found"}})
            return
        if path not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not self.authorized(given):
                await _json(
                    send,
                    401,
                    {
                        "error": {
                            "message": "missing or wrong API key (Authorization: Bearer ...)",
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                        }
                    },
                    extra=[(b"www-authenticate", b"Bearer")],
                )
                return
        await self.app(scope, receive, send)


async def _json(send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def build_app(model_dir: Path, *, device: str = "auto", log_level: str = "info") -> App:
    """`transformers serve MODEL`'s FastAPI app, with the model loaded (pinned), not started."""
    try:
        from transformers.cli.serve import Serve
    except ImportError as exc:
        raise RuntimeError(
            f"transformers serve is not available ({exc}); install the serve extra: "
            "pip install 'fm9g-launch[serve]' (transformers>=5.24, fastapi, uvicorn, accelerate)"
        ) from None

    class _AppOnly(Serve):  # type: ignore[misc]
        def start_server(self) -> None:  # the app is run by `run_app` below, on our socket
            pass

    command = _AppOnly(str(model_dir), device=device, host="127.0.0.1", port=0, log_level=log_level, non_blocking=True)
    return command.server.config.app  # type: ignore[no-any-return]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def run_app(model_dir: Path, api_key: str, sock: socket.socket, *, log_level: str = "info") -> None:
    """Load the model, then answer on `sock` until SIGTERM/SIGINT (uvicorn's own handlers)."""
    import uvicorn

    app = ApiKeyGate(build_app(model_dir, log_level=log_level), api_key)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def read_api_key(path: Path) -> str:
    """The API key held in `path`; an empty file is an error, never an open server."""
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path}: the API key file is empty")
    return key


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
    endpoint = {
        "host": host,
        "port": port,
        "url": f"http://{host}:{port}/v1",
        "job_id": job,
        "engine": engine,
        "model": str(model),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "published_at": time.time(),
    }
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
    sock = bind(host, port)
    publish(endpoint, host=host, port=sock.getsockname()[1], engine="transformers", model=model, job=job)
    # Slurm's USR1 before the walltime (--signal=B:USR1@lead) becomes uvicorn's graceful SIGTERM;
    # a SIGTERM while the model still loads (before uvicorn's own handlers) still unpublishes.
    signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run_app(model, read_api_key(key_file), sock)
    finally:
        unpublish(endpoint, job)
    return 0


def serve_vllm(model: Path, key_file: Path, endpoint: Path, host: str, port: int, job: str) -> int:
    port = port or free_port(host)
    env = {**os.environ, "VLLM_API_KEY": read_api_key(key_file)}
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "auto",
        "--tokenizer-mode",
        tokenizer_mode(model),
    ]
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
    parser = argparse.ArgumentParser(
        prog="python -m fm9g.launchers.serve",
        description="Run an OpenAI-compatible server for one model and publish its endpoint.",
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--endpoint", type=Path, required=True, help="endpoint.json to publish")
    parser.add_argument("--api-key-file", type=Path, required=True)
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = parser.parse_args(argv)
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
