"""POST /v1/images/generations, POST /v1/images/edits, GET /v1/images/files/{name}."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from server import images
from server.auth import require_api_key
from server.errors import InvalidRequest, NotFound, UnsupportedMediaType
from server.protocol import QUOTED_CHARS, quoted
from server.serving import ClientContext, ServedImages, server_timing

router = APIRouter()
keyed = [Depends(require_api_key)]

IMAGE_PART_NAMES = ("image", "image[]")
# A url-encoded form can carry the image as base64 just like a multipart text part can.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# OpenAI's edits endpoint takes a mask; this model edits from the prompt alone, and silently
# dropping a mask would return an image the caller did not ask for.
UNSUPPORTED_FIELDS = {"mask": "mask is not supported: describe the region to change in the prompt"}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# Extension: a client may ask for a shorter deadline than the server's --request-timeout.
TIMEOUT_HEADER = "x-request-timeout"


def _client(request: Request) -> ClientContext:
    public = request.app.state.stepimage.settings.public_url
    timeout = None
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            message = f"{TIMEOUT_HEADER} must be a positive number of seconds, got {quoted(raw)}"
            raise InvalidRequest(TIMEOUT_HEADER, message)
    return ClientContext(
        base_url=(public or str(request.base_url)).rstrip("/"),
        timeout=timeout,
        disconnected=request.is_disconnected,
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(None, "The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        # The parser recurses once per nesting level; ~1000 levels exhaust the stack (issue 13: this was a 500).
        raise InvalidRequest(None, "The request body is JSON nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest(None, "The request body must be a JSON object.", code="invalid_json")
    return body


def _check_unsupported(fields: dict[str, Any]) -> None:
    for name, message in UNSUPPORTED_FIELDS.items():
        if fields.get(name) not in (None, ""):
            raise InvalidRequest(name, message, code="unsupported_parameter")


async def _edit_parts(request: Request) -> tuple[dict[str, Any], bytes | None, str | None]:
    """Fields, plus the input image as file bytes or as base64 text, from a multipart or JSON body."""
    media_type = _media_type(request)
    if media_type == "application/json":
        body = await _json_object(request)
        text = body.pop("image", None)
        if text is not None and not isinstance(text, str):
            raise InvalidRequest("image", "image must be a base64 string or a data URL in a JSON body")
        return body, None, text
    if media_type not in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content type {quoted(media_type) if media_type else '(none)'} is not accepted here: "
            "send multipart/form-data or application/json."
        )
    max_bytes = request.app.state.stepimage.settings.max_body_bytes
    form = await request.form(max_files=8, max_fields=100, max_part_size=max_bytes)
    fields: dict[str, Any] = {}
    parts: list[UploadFile | str] = []
    for key, value in form.multi_items():
        if key in IMAGE_PART_NAMES:
            parts.append(value)
        elif isinstance(value, UploadFile):
            if key in UNSUPPORTED_FIELDS:
                fields[key] = value.filename or "file"
                continue
            raise InvalidRequest(key[:QUOTED_CHARS], f"{quoted(key)} must be a text field, not a file")
        else:
            fields[key] = value
    if len(parts) > 1:
        raise InvalidRequest("image", f"exactly one image is accepted, got {len(parts)}")
    if not parts:
        return fields, None, None
    part = parts[0]
    if isinstance(part, UploadFile):
        return fields, await part.read(), None
    return fields, None, part


def _image_response(served: ServedImages) -> JSONResponse:
    return JSONResponse(served.body, headers={"server-timing": server_timing(served.timings_ms)})


@router.post("/v1/images/generations", dependencies=keyed)
async def generations(request: Request) -> JSONResponse:
    if _media_type(request) != "application/json":
        raise UnsupportedMediaType("Send the request body as application/json.")
    service = request.app.state.stepimage.service
    fields = service.parse_generation(await _json_object(request))
    return _image_response(await service.generate(fields, _client(request)))


@router.post("/v1/images/edits", dependencies=keyed)
async def edits(request: Request) -> JSONResponse:
    service = request.app.state.stepimage.service
    raw, image_bytes, image_text = await _edit_parts(request)
    _check_unsupported(raw)
    fields = service.parse_edit(raw, form=_media_type(request) in FORM_TYPES)
    if fields.image is not None and image_text is None and image_bytes is None:
        image_text = fields.image
    # Decoding a 4096x4096 upload takes a noticeable fraction of a second: keep it off the event loop.
    image = await asyncio.to_thread(service.decode_input, image_bytes, image_text)
    return _image_response(await service.edit(fields, image, _client(request)))


@router.get("/v1/images/files/{name}")
async def stored_file(name: str, request: Request) -> Response:
    found = request.app.state.stepimage.store.lookup(name)
    if found is None:
        raise NotFound("No such file: the link is unknown or has expired.")
    path, seconds_left = found
    try:
        content = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:  # swept between the lookup and the read
        raise NotFound("No such file: the link is unknown or has expired.") from None
    extension = name.rsplit(".", 1)[1]
    fmt = {"jpg": "jpeg"}.get(extension, extension)
    return Response(
        content,
        media_type=images.media_type(fmt),
        headers={"cache-control": f"private, max-age={int(seconds_left)}"},
    )
