"""The CPU serving engine: `transformers serve`'s own OpenAI-compatible FastAPI app
(/v1/completions, /v1/chat/completions with streaming, /v1/models, /health), pinned to
one model folder, behind an API-key gate, on a socket we bind ourselves.

Why not the `transformers serve` command as is: it has no API key option, it exposes
/load_model and /reset (load any model, drop the pinned one), and it cannot report the
port of `--port 0`.  So this module builds the same app through the command's own class
(`transformers.cli.serve.Serve` with the server start left out), wraps it in `ApiKeyGate`
and runs uvicorn on a socket it has already bound.

    python -m fm9g.orchestrator.inference.hf_server --model HF_DIR --api-key-file FILE [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import hmac
import json
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})                      # readiness probes carry no key (as vLLM's)
BLOCKED_PATHS = frozenset({"/load_model", "/reset"})     # would let a caller swap the pinned model


class ApiKeyGate:
    """ASGI middleware: every HTTP request but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app: App, api_key: str) -> None:
        if not api_key:
            raise ValueError("an empty API key would let every request in")
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

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
            if not hmac.compare_digest(given, self.expected):
                await _json(send, 401, {"error": {"message": "missing or wrong API key (Authorization: Bearer ...)",
                                                  "type": "invalid_request_error", "code": "invalid_api_key"}},
                            extra=[(b"www-authenticate", b"Bearer")])
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
        raise RuntimeError(f"transformers serve is not available ({exc}); install the serve extra: "
                           "pip install 'fm9g-launch[serve]' (transformers>=5.24, fastapi, uvicorn, accelerate)") from None

    class _AppOnly(Serve):  # type: ignore[misc]
        def start_server(self) -> None:  # the app is run by `serve` below, on our socket
            pass

    command = _AppOnly(str(model_dir), device=device, host="127.0.0.1", port=0, log_level=log_level,
                       non_blocking=True)
    return command.server.config.app  # type: ignore[no-any-return]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(model_dir: Path, api_key: str, sock: socket.socket, *, log_level: str = "info") -> None:
    """Load the model, then answer on `sock` until SIGTERM/SIGINT (uvicorn's own handlers)."""
    import uvicorn

    app = ApiKeyGate(build_app(model_dir, log_level=log_level), api_key)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def read_api_key(path: Path) -> str:
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(f"{path}: the API key file is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm9g.orchestrator.inference.hf_server",
                                     description="OpenAI-compatible server (transformers serve's app) with an API key.")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    parser.add_argument("--api-key-file", type=Path, required=True, help="file holding the API key (mode 0600)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    sock = bind(args.host, args.port)
    print(f"hf_server: listening on {args.host}:{sock.getsockname()[1]}", flush=True)
    serve(args.model, read_api_key(args.api_key_file), sock, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
