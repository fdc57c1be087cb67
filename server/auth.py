"""API keys: bearer tokens compared in constant time."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import AuthenticationFailed

# Declares the bearer key to the OpenAPI document (a security scheme on every route that depends on
# require_api_key); it never rejects anything itself, so the 401 stays ours, with our message and envelope.
bearer_scheme = HTTPBearer(
    scheme_name="bearerAuth",
    description="One of the server's API keys (--api-key), as 'Authorization: Bearer <key>'.",
    auto_error=False,
)


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


async def require_api_key(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    """FastAPI dependency for the routes that need a key."""
    check_api_key(request, request.app.state.stepimage.settings.api_keys)
