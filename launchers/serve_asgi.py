"""The ASGI layers fm9g puts in front of transformers serve's app (fm9g.launchers.serve):
an API-key gate, and the served model's name.  Plain ASGI, no framework: they wrap any app.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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


class ModelAlias:
    """ASGI middleware: the pinned transformers app answers to `name` as well as to the
    folder's path (it knows only the path): a request's `model` that is either becomes the
    path; the path in responses (JSON and streamed chunks, and /v1/models) becomes `name`,
    listed first, as vLLM lists its first --served-model-name."""

    def __init__(self, app: App, name: str, path: str) -> None:
        self.app, self.name, self.path = app, name, path
        self.quoted_path, self.quoted_name = json.dumps(path).encode(), json.dumps(name).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST":
            body = await _read_body(receive)
            try:
                request = json.loads(body) if body else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                request = None  # the app answers malformed JSON itself
            if isinstance(request, dict) and "model" in request:
                if request["model"] not in (self.name, self.path):
                    message = f"The model `{request['model']}` does not exist; this server serves `{self.name}`."
                    await _json(send, 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
                    return
                request["model"] = self.path
                body = json.dumps(request).encode()
            receive = _replay(body)
        if scope.get("path") == "/v1/models":
            await self.app(scope, receive, self._models(send))
        else:
            await self.app(scope, receive, self._renamed(send))

    def _renamed(self, send: Send) -> Send:
        """Replace the path by the name in every body chunk (fixing content-length)."""
        held: list[Message] = []

        async def renamed(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.append(message)  # sent with the first body chunk, once its length is known
                return
            if message["type"] == "http.response.body":
                body = message.get("body", b"").replace(b'"model":' + self.quoted_path, b'"model":' + self.quoted_name)
                body = body.replace(b'"model": ' + self.quoted_path, b'"model": ' + self.quoted_name)
                message = {**message, "body": body}
                if held:
                    start = held.pop()
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    if not message.get("more_body", False):
                        headers.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": headers})
            await send(message)

        return renamed

    def _models(self, send: Send) -> Send:
        """/v1/models lists the name first, then the path (both are accepted)."""
        held: list[Message] = []
        chunks: list[bytes] = []

        async def models(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.append(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                listing = json.loads(body)
                entries = [e for e in listing.get("data", []) if e.get("id") == self.path]
                listing["data"] = [{**e, "id": self.name} for e in entries] + entries
                body = json.dumps(listing).encode()
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                pass  # an error response passes as it is
            start = held.pop()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        return models


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    """A `receive` that hands the (rewritten) body over once, then waits like uvicorn's."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no more request body; only a disconnect would come
        return {"type": "http.disconnect"}

    return receive
