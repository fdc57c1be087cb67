"""API keys: bearer tokens compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import AuthenticationFailed


def key_is_valid(presented: str, keys: list[str]) -> bool:
    # Compare against every key without stopping early, so timing says nothing about which key matched.
    presented_bytes = presented.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented_bytes, key.encode("utf-8"))
    return matched


def check_api_key(request: Request, keys: list[str]) -> None:
    """Raise 401 unless keys are off or the request carries `Authorization: Bearer <a configured key>`."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
        )
    if not key_is_valid(token.strip(), keys):
        raise AuthenticationFailed("Incorrect API key provided.")


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the routes that need a key."""
    check_api_key(request, request.app.state.stepimage.settings.api_keys)
