"""ApiKeyGate, the API-key check in front of the CPU server, as a plain ASGI app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fm9g.launchers.serve import ApiKeyGate


async def _inner(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def call(path: str, headers: list[tuple[bytes, bytes]] | None = None, kind: str = "http") -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    gate = ApiKeyGate(_inner, "s3cret")
    asyncio.run(gate({"type": kind, "path": path, "headers": headers or []}, receive, send))
    return sent[0]["status"] if sent else 0


def test_key_required_except_health() -> None:
    assert call("/health") == 200
    assert call("/v1/models") == 401
    assert call("/v1/completions", [(b"authorization", b"Bearer wrong")]) == 401
    assert call("/v1/completions", [(b"authorization", b"s3cret")]) == 401
    assert call("/v1/chat/completions", [(b"authorization", b"Bearer s3cret")]) == 200


def test_model_swapping_routes_are_closed() -> None:
    for path in ("/load_model", "/reset"):
        assert call(path, [(b"authorization", b"Bearer s3cret")]) == 404


def test_empty_key_refused() -> None:
    with pytest.raises(ValueError):
        ApiKeyGate(_inner, "")


def test_scheme_is_case_insensitive() -> None:
    """RFC 7235 §2.1: an auth scheme matches case-insensitively; the key itself does not."""
    for scheme in (b"bearer", b"BEARER", b"bEaReR"):
        assert call("/v1/models", [(b"authorization", scheme + b" s3cret")]) == 200
    assert call("/v1/models", [(b"authorization", b"bearer  s3cret")]) == 200
    assert call("/v1/models", [(b"authorization", b"bearer S3CRET")]) == 401
    assert call("/v1/models", [(b"authorization", b"basic s3cret")]) == 401
    assert call("/v1/models", [(b"authorization", b"bearers3cret")]) == 401
