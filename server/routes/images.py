"""POST /v1/images/generations, POST /v1/images/edits, GET /v1/images/files/{name}.

The routes read the body (JSON, multipart or url-encoded), hand the fields and input images to serving, and pick the
response type: one JSON body, or server-sent events for `stream: true`.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.multipart import parse_options_header
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server import images
from server.auth import require_api_key
from server.errors import InvalidRequest, NotFound, UnsupportedMediaType
from server.protocol import QUOTED_CHARS, quoted
from server.serving import ClientContext, EventStream, ImageSource, ServedImages, server_timing

router = APIRouter()
keyed = [Depends(require_api_key)]

IMAGE_PART_NAMES = ("image", "image[]")
MASK_PART_NAME = "mask"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Text fields a form may carry besides its images and mask: the request's fields, with room for clients' extras.
MAX_FORM_FIELDS = 100


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
        request_id=request.scope.get("state", {}).get("request_id", "-"),
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


# Bytes every charset a multipart body may name must read as themselves: the body's own structure (boundaries,
# part headers, field names) is ASCII. This refuses codecs that are no text encoding at all (rot13, hex, base64, uu),
# and text encodings that would misread that structure (UTF-16, punycode, UTF-7).
_ASCII_SAMPLE = bytes(range(0x20, 0x7F))


def _check_charset(content_type: str) -> None:
    """Refuse a multipart body whose charset parameter names no ASCII-compatible text encoding; Starlette would read
    an unknown one as Latin-1 and fail with a server error on a codec that is not a text encoding."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset")
    if charset is None:
        return
    name = charset.decode("latin-1")
    try:
        readable = _ASCII_SAMPLE.decode(name) == _ASCII_SAMPLE.decode("ascii")
    except (LookupError, UnicodeError):
        readable = False
    if not readable:
        raise InvalidRequest(
            None,
            f"The multipart body's charset {quoted(name)} is not a text encoding this server reads; send UTF-8 "
            "(the default when the content type names no charset).",
            code="invalid_multipart",
        )


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, stricter in three ways a client deserves to hear about: a charset that is no
    ASCII-compatible text encoding is refused instead of being read as Latin-1 (or failing inside the parser), a
    text part that is not valid in the body's charset (UTF-8 unless the content type says otherwise) is refused
    instead of being read as Latin-1, and a body that ends before its closing boundary is refused instead of being
    taken as complete."""

    complete = False

    def __init__(self, *args: Any, max_images: int, **kwargs: Any) -> None:
        # Files a form may carry: up to max_images images and one mask. Starlette's own limit sits one above, so
        # that a client with too many files meets our message rather than the parser's.
        self.max_image_files = max_images + 1
        self.files_seen = 0
        super().__init__(*args, max_files=self.max_image_files + 1, **kwargs)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is None:
            return
        self.files_seen += 1
        if self.files_seen > self.max_image_files:
            limit = self.max_image_files - 1
            raise InvalidRequest(
                "image",
                f"at most {limit} input images are accepted per edit, plus one mask; this form has more than "
                f"{limit + 1} files",
            )

    async def parse(self) -> FormData:
        _check_charset(self.headers["content-type"])
        try:
            return await super().parse()
        except UnicodeError:
            # A field name or file name the charset cannot decode (Starlette catches only some decoding errors).
            raise InvalidRequest(
                None, f"A part's header is not valid {self._charset} text.", code="invalid_multipart"
            ) from None

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except UnicodeError:
                name = part.field_name
                raise InvalidRequest(
                    name[:QUOTED_CHARS] or None,
                    f"{quoted(name) if name else 'a form field'} is not valid {self._charset or 'utf-8'} text",
                ) from None
        super().on_part_end()

    def on_end(self) -> None:
        self.complete = True
        super().on_end()


async def _read_form(request: Request) -> FormData:
    settings = request.app.state.stepimage.settings
    if _media_type(request) == "application/x-www-form-urlencoded":
        return _url_encoded_form(await request.body())
    try:
        async with aclosing(request.stream()) as stream:
            parser = _StrictMultiPartParser(
                request.headers,
                stream,
                max_images=settings.max_edit_images,
                # Images (and the mask) may also come as base64 text parts.
                max_fields=MAX_FORM_FIELDS + settings.max_edit_images + 1,
                max_part_size=settings.max_body_bytes,
            )
            form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(
            None, f"The multipart body is malformed: {exc.message}", code="invalid_multipart"
        ) from None
    if not parser.complete:
        await form.close()
        raise InvalidRequest(
            None, "The multipart body ended before its closing boundary; it was cut short.", code="invalid_multipart"
        )
    return form


def _url_encoded_form(body: bytes) -> FormData:
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except UnicodeDecodeError:
        raise InvalidRequest(None, "The form body is not valid url-encoded UTF-8 text.", code="invalid_value") from None
    except ValueError:
        raise InvalidRequest(None, f"The form has more than {MAX_FORM_FIELDS} fields.", code="invalid_value") from None
    return FormData(pairs)


async def _edit_parts(request: Request) -> tuple[dict[str, Any], list[ImageSource] | None, ImageSource | None]:
    """Fields, plus the input images and mask of a form body in the order sent (None for a JSON body, whose images
    are fields that serving reads after validation)."""
    media_type = _media_type(request)
    if media_type == "application/json":
        return await _json_object(request), None, None
    if media_type not in FORM_TYPES:
        raise UnsupportedMediaType(
            f"Content type {quoted(media_type) if media_type else '(none)'} is not accepted here: "
            "send multipart/form-data or application/json."
        )
    form = await _read_form(request)
    try:
        fields: dict[str, Any] = {}
        sources: list[ImageSource] = []
        mask: ImageSource | None = None
        stray_files: list[str] = []
        for key, value in form.multi_items():
            payload = await value.read() if isinstance(value, UploadFile) else value
            if key in (*IMAGE_PART_NAMES, MASK_PART_NAME) and not payload:
                # A file input left empty: browsers (and Swagger UI) still send the part, with nothing in it.
                continue
            if key in IMAGE_PART_NAMES:
                sources.append(("image", payload))
            elif key == MASK_PART_NAME:
                if mask is not None:
                    raise InvalidRequest("mask", "send at most one mask")
                mask = ("mask", payload)
            elif isinstance(value, UploadFile):
                stray_files.append(key)
            else:
                fields[key] = value
    finally:
        await form.close()
    if stray_files:
        shown = ", ".join(quoted(name) for name in stray_files[:3])
        if not sources:
            raise InvalidRequest(
                "image",
                f"image is required: send the picture as a file part named image (or image[] for several); "
                f"got a file part named {shown} instead",
                code="missing_required_parameter",
            )
        raise InvalidRequest(
            stray_files[0][:QUOTED_CHARS],
            f"unexpected file part {shown}: files go in image, image[] or mask; other fields are text",
        )
    return fields, sources, mask


def _image_response(served: ServedImages) -> JSONResponse:
    return JSONResponse(served.body, headers={"server-timing": server_timing(served.timings_ms)})


def _event_response(events: EventStream) -> StreamingResponse:
    # Proxies must pass each event on as it comes instead of buffering the response.
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


@router.post("/v1/images/generations", dependencies=keyed)
async def generations(request: Request) -> Response:
    if _media_type(request) != "application/json":
        raise UnsupportedMediaType("Send the request body as application/json.")
    service = request.app.state.stepimage.service
    fields = service.parse_generation(await _json_object(request))
    if fields.stream:
        return _event_response(await service.stream_generation(fields, _client(request)))
    return _image_response(await service.generate(fields, _client(request)))


@router.post("/v1/images/edits", dependencies=keyed)
async def edits(request: Request) -> Response:
    service = request.app.state.stepimage.service
    raw, sources, mask = await _edit_parts(request)
    if sources is not None and "images" in raw:
        # A form's images (files or base64 text) arrive as parts named image; `images` is the JSON body's shape.
        raise InvalidRequest("images", "in a form, send input images as parts named image or image[]")
    fields = service.parse_edit(raw, form=sources is not None)
    if sources is None:
        sources, mask = service.json_edit_sources(fields)
    # Decoding several 4096x4096 uploads takes a noticeable fraction of a second: keep it off the event loop.
    inputs = await asyncio.to_thread(service.decode_edit_inputs, sources, mask)
    if fields.stream:
        return _event_response(await service.stream_edit(fields, inputs, _client(request)))
    return _image_response(await service.edit(fields, inputs, _client(request)))


@router.get("/v1/images/files/{name}")
async def stored_file(name: str, request: Request) -> Response:
    # Reading may be a request to the bucket: off the event loop. Expired is a 404 even before a sweep.
    found = await asyncio.to_thread(request.app.state.stepimage.store.fetch, name)
    if found is None:
        raise NotFound("No such file: the link is unknown or has expired.")
    # Streamed in chunks, so a large result never sits whole in memory; closed even if the client leaves early.
    return StreamingResponse(
        found.chunks,
        media_type=images.media_type_of_file(name),
        headers={"cache-control": f"private, max-age={int(found.seconds_left)}", "content-length": str(found.size)},
        background=BackgroundTask(found.close),
    )
