"""The playground page: its static files (package data under `static/`), the security headers they are
served with, and the public description of the server that the page reads (`page_config`).

The page is one more client of the public API: it sends the same requests, with the same key, as curl
or the openai SDK would, so it adds no way in. `page_config` says only what any client could learn by
trying the API (served sizes, field limits, whether a key is needed, whether the random-weight model is
serving), never a key, a path or a device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pipelines.base import BackendInfo
from server.config import Settings
from server.protocol import DEFAULT_SIZE, GenerationsBody

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Only our own scripts and styles run (no inline code, so an injected <script> or style attribute is
# inert); images may also be data: and blob: URLs because results arrive as base64 and uploads are read
# locally; requests go to this origin only. Nothing may frame the page (it holds a key).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidate every time (the ETag makes that a 304), so an upgraded server never pairs a new page
    # with an old script.
    "cache-control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of the page, by name, read once from the installed package."""
    assets = {}
    for entry in (resources.files(__name__) / "static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if not entry.is_file() or suffix not in _MEDIA_TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[entry.name] = Asset(body=body, media_type=_MEDIA_TYPES[suffix], etag=etag)
    return assets


_LIMIT_KEYS = ("default", "minimum", "maximum", "maxLength", "enum")


def _field_limits() -> dict[str, dict[str, Any]]:
    """Defaults and ranges of the fields the page offers, from the same models that validate requests."""
    properties = GenerationsBody.model_json_schema()["properties"]
    limits = {}
    for name in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "output_format", "output_compression",
                 "partial_images", "n"):  # fmt: skip
        schema = properties.get(name)
        if schema is None:
            continue
        # Optional fields are anyOf [the type, null]; the limits sit on the first branch.
        branches = [schema, *schema.get("anyOf", [])]
        limits[name] = {key: branch[key] for branch in branches for key in _LIMIT_KEYS if key in branch}
    return limits


def page_config(settings: Settings, info: BackendInfo | None, ready: bool) -> dict[str, Any]:
    model = None
    if info is not None:
        model = {"backend": info.backend, "random_weights": info.random_weights, "notes": list(info.notes)}
    return {
        "model_name": settings.model_name,
        "sizes": list(settings.sizes),
        "default_size": DEFAULT_SIZE,
        "max_n": settings.max_n,
        "keys_required": bool(settings.api_keys),
        "ready": ready,
        "model": model,
        "fields": _field_limits(),
    }
