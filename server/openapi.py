"""The OpenAPI document (/openapi.json) and the offline documentation pages (/docs, /redoc).

The document is FastAPI's own for the routes, completed from the wire models in server/protocol.py (the same models
that validate requests, so the schema and the validation cannot disagree) and from the running configuration (served
sizes, --max-n, model names, whether keys are required): the request bodies of both image endpoints (JSON; for edits
also multipart/form-data and url-encoded forms) and their responses (JSON, or server-sent events with stream: true),
OpenAI's error envelope as the body of every error status, and the bearer key as a security scheme (declared by
server/auth.py's dependency) on the routes that check it. The image routes parse their bodies themselves, so that
every validation failure is a 400 in our envelope and never FastAPI's 422: their bodies are documented here instead of
being declared as route parameters.

Swagger UI and ReDoc run on assets this server serves itself from the fastapi-offline package (pinned in pyproject),
so both pages work on an air-gapped host.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic.json_schema import models_json_schema

from server import auth
from server.config import Settings
from server.protocol import (
    EditsBody,
    ErrorResponse,
    GenerationsBody,
    ImagesResponse,
    ImageStreamEvent,
)

ASSETS_URL = "/docs/assets"
REF = "#/components/schemas/{model}"
# Component names of an edit sent as a form, derived from EditsBody.
EDITS_FORM = "EditsForm"
EDITS_URLENCODED = "EditsUrlEncoded"
# Swagger UI opens every operation with its request editor already editable.
SWAGGER_UI_PARAMETERS = {"tryItOutEnabled": True, "displayRequestDuration": True, "defaultModelsExpandDepth": 0}

# Input image types the edits endpoint decodes (server/images.py).
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff"
# The image fields of an edit sent as a form: (as multipart file parts, as url-encoded base64 text fields).
FORM_IMAGE_FIELDS = {
    "image": (
        "The image to edit, as a file part named image (image[] is the same); a base64 or data-URL text part is "
        "accepted too. Repeat the part to add reference images after the first.",
        "The image to edit, base64 or a data URL, in a field named image (image[] is the same). Repeat the field to "
        "add reference images after the first.",
    ),
    "mask": (
        "A PNG with alpha, the first image's size, as a file part (or base64 text): fully transparent pixels mark "
        "the area to change; every other pixel is kept exactly.",
        "A PNG with alpha, the first image's size, base64 or a data URL: fully transparent pixels mark the area to "
        "change; every other pixel is kept exactly.",
    ),
}
FORM_REPEATED = ("image",)
EMPTY_FORM_VALUE = {"type": "string", "const": "", "description": "Empty: the same as leaving the field out."}
JSON_ONLY_FIELDS = ("images",)

ERROR_STATUSES = {
    400: "A field is missing, malformed or out of range, or an input image cannot be used (param names the field); "
    "or the body is not valid JSON (invalid_json) or multipart (invalid_multipart).",
    401: "Missing or wrong API key.",
    404: "Unknown model (model_not_found), route or stored file.",
    408: "The request body stopped arriving within the server's timeout (request_timeout).",
    413: "The request body is larger than the server's limit.",
    415: "A content type this endpoint does not take.",
    431: "Request headers over the server's limit (headers_too_large).",
    429: "The queue is full; retry after Retry-After seconds.",
    500: "Anything unexpected: a short message with the request id, nothing internal.",
    503: "Not ready yet (the model is loading) or shutting down, retry after Retry-After seconds; or result storage "
    "is unreachable (storage_unavailable).",
    504: "The request's deadline passed before it finished.",
    507: "A url result cannot be stored: result storage is out of space (insufficient_storage).",
}
RETRY_AFTER_STATUSES = (429, 503)

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
METRICS_PATH = "/metrics"
# Error statuses beyond 431 and 500 (every route) and 401 (every keyed route), by path.
EXTRA_ERRORS = {
    GENERATIONS_PATH: (400, 404, 408, 413, 415, 429, 503, 504, 507),
    EDITS_PATH: (400, 404, 408, 413, 415, 429, 503, 504, 507),
    "/v1/images/files/{name}": (404, 503),
    "/ready": (503,),
}


def create_documented_app(settings: Settings, **fastapi_options: Any) -> FastAPI:
    """A FastAPI app whose /docs and /redoc load their assets from this server, and whose /openapi.json is
    `openapi_document(app, settings)`, versioned as the installed package."""
    app = FastAPIOffline(
        static_url=ASSETS_URL,
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        version=_package_version(),
        **fastapi_options,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _package_version() -> str:
    try:
        return version("stepimage")
    except PackageNotFoundError:  # a source tree imported without being installed
        return "unknown"


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    components.setdefault("schemas", {}).update(component_schemas(settings))
    components["responses"] = error_response_components()
    image_operations = {GENERATIONS_PATH: generations_operation, EDITS_PATH: edits_operation}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            statuses = {431, 500, *EXTRA_ERRORS.get(path, ())}
            # FastAPI documents a 422 for routes with parameters; our handler answers those failures with a 400.
            if operation["responses"].pop("422", None) is not None:
                statuses.add(400)
            if path == METRICS_PATH and settings.metrics_require_key:
                operation["security"] = [{auth.bearer_scheme.scheme_name: []}]
            if "security" in operation:
                statuses.add(401)
                if not settings.api_keys:
                    # An open server: the key is optional, and the document says so.
                    operation["security"] = [*operation["security"], {}]
            if path in image_operations:
                operation.update(image_operations[path](settings))
            operation["responses"].update(error_responses(sorted(statuses)))
    for unused in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(unused, None)
    return document


# -- schemas ---------------------------------------------------------------------------------------------------------


def component_schemas(settings: Settings) -> dict[str, Any]:
    """Every wire model's JSON schema, constrained by this server's configuration, plus the multipart form of an
    edit derived from the JSON one."""
    _, top = models_json_schema(
        [
            (GenerationsBody, "validation"),
            (EditsBody, "validation"),
            (ImagesResponse, "serialization"),
            (ImageStreamEvent, "serialization"),
            (ErrorResponse, "serialization"),
        ],
        ref_template=REF,
    )
    schemas: dict[str, Any] = top["$defs"]
    for schema in schemas.values():
        # pydantic titles every property after its name ("Cfg Scale"); the pages show the name already.
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
    for name in (GenerationsBody.__name__, EditsBody.__name__):
        properties = schemas[name]["properties"]
        _constrain(properties["n"], maximum=settings.max_n)
        _constrain(properties["model"], enum=list(settings.model_names))
        properties["model"]["examples"] = [settings.model_name]
    _constrain(schemas[GenerationsBody.__name__]["properties"]["size"], enum=list(settings.sizes))
    schemas[EDITS_FORM] = edits_form_schema(schemas[EditsBody.__name__])
    schemas[EDITS_URLENCODED] = edits_form_schema(schemas[EditsBody.__name__], files=False)
    return schemas


def _constrain(schema: dict[str, Any], **constraints: Any) -> None:
    """Add constraints to a property, or to its non-null branch when it is optional."""
    branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
    for branch in branches:
        branch.update(constraints)


def edits_form_schema(json_schema: dict[str, Any], *, files: bool = True) -> dict[str, Any]:
    """An edit as a form: the JSON body's fields, with the images as file parts (multipart) or as base64 text
    fields (url-encoded, files=False); `image` repeats for several images."""
    form = copy.deepcopy(json_schema)
    form["title"] = "Edits form" if files else "Edits url-encoded form"
    properties = form["properties"]
    for name in JSON_ONLY_FIELDS:
        properties.pop(name, None)
    for schema in properties.values():
        # A form has no null: an optional field is simply left out (a form tool would otherwise send "null").
        branches = [branch for branch in schema.pop("anyOf", []) if branch.get("type") != "null"]
        if len(branches) == 1:
            schema.update(branches[0])
        elif branches:
            schema["anyOf"] = branches
        if "default" in schema and schema["default"] is None:
            del schema["default"]
            if "examples" not in schema:
                # Empty means absent (what a form sends for an input left empty); listed first, it is also what a
                # form tool fills in, rather than a made-up value such as the largest seed.
                value = {key: schema.pop(key) for key in list(schema) if key != "description"}
                schema["anyOf"] = [EMPTY_FORM_VALUE, value]
    for name, (as_file, as_text) in FORM_IMAGE_FIELDS.items():
        if name not in properties:
            continue
        description = as_file if files else as_text
        file_part = {"type": "string"}
        if files:
            file_part.update(format="binary", contentMediaType="application/octet-stream")
        if name in FORM_REPEATED:
            properties[name] = {"type": "array", "items": file_part, "description": description}
        else:
            properties[name] = {**file_part, "description": description}
    form["required"] = sorted({*form.get("required", []), "image"})
    return form


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


# -- operations ------------------------------------------------------------------------------------------------------


def generations_operation(settings: Settings) -> dict[str, Any]:
    body = {"application/json": {"schema": _ref(GenerationsBody.__name__), "example": generation_example(settings)}}
    return _image_operation(
        "createImage", "Create images from a prompt", body, "The images, one item per image.", "image_generation"
    )


def edits_operation(settings: Settings) -> dict[str, Any]:
    image_types = {"contentType": IMAGE_MEDIA_TYPES}
    body = {
        "multipart/form-data": {"schema": _ref(EDITS_FORM), "encoding": {"image": image_types, "mask": image_types}},
        "application/json": {"schema": _ref(EditsBody.__name__), "example": edit_example(settings)},
        "application/x-www-form-urlencoded": {"schema": _ref(EDITS_URLENCODED)},
    }
    return _image_operation(
        "createImageEdit", "Edit an image from a prompt", body, "The edits, each the first input's size.", "image_edit"
    )


def _image_operation(
    operation_id: str, summary: str, body: dict[str, Any], result: str, event_prefix: str
) -> dict[str, Any]:
    return {
        "summary": summary,
        "operationId": operation_id,
        "requestBody": {"required": True, "content": body},
        "responses": {"200": images_response(result, event_prefix)},
    }


def images_response(description: str, event_prefix: str) -> dict[str, Any]:
    stream = (
        f"With stream: true, server-sent events instead: `{event_prefix}.partial_image` for each preview "
        f"(partial_images of them per image), then one `{event_prefix}.completed` per image (with usage); each "
        "event's data is one JSON object. A failure after the stream started arrives as an `error` event whose data "
        "is the error envelope."
    )
    return {
        "description": f"{description} {stream}",
        "headers": {
            "server-timing": {
                "description": "Stage durations in ms: queue, encode_prompt, denoise, decode, encode_image, total "
                "(not sent on a stream).",
                "schema": {"type": "string"},
            },
            **_request_id_header(),
        },
        "content": {
            "application/json": {"schema": _ref(ImagesResponse.__name__)},
            "text/event-stream": {
                "schema": {
                    "description": "The data of one event: an image event, or the error envelope of an error event.",
                    "oneOf": [_ref(ImageStreamEvent.__name__), _ref(ErrorResponse.__name__)],
                },
                "example": stream_example(event_prefix),
            },
        },
    }


def stream_example(event_prefix: str) -> str:
    """What a stream with one partial image looks like on the wire (image data shortened)."""
    common = {"created_at": 1767225600, "size": "1024x1024", "output_format": "png", "seed": 42, "image_index": 0}
    partial = {"type": f"{event_prefix}.partial_image", **common, "b64_json": "iVBORw0...", "partial_image_index": 0}
    usage = {
        "input_tokens": 12,
        "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
        "output_tokens": 4096,
        "total_tokens": 4108,
    }
    completed = {"type": f"{event_prefix}.completed", **common, "b64_json": "iVBORw0...", "usage": usage}
    return "".join(
        f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
        for event in (partial, completed)
    )


def error_response_components() -> dict[str, Any]:
    """One reusable response per error status, each with the error envelope as its body."""
    responses = {}
    for status, description in ERROR_STATUSES.items():
        headers = _request_id_header()
        if status in RETRY_AFTER_STATUSES:
            headers["Retry-After"] = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
        responses[_error_name(status)] = {
            "description": description,
            "headers": headers,
            "content": {"application/json": {"schema": _ref(ErrorResponse.__name__)}},
        }
    return responses


def error_responses(statuses: list[int]) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{_error_name(status)}"} for status in statuses}


def _error_name(status: int) -> str:
    return f"Error{status}"


def _request_id_header() -> dict[str, Any]:
    description = "The request's id (the client's own when sane)."
    return {"x-request-id": {"description": description, "schema": {"type": "string"}}}


# -- examples --------------------------------------------------------------------------------------------------------


def generation_example(settings: Settings) -> dict[str, Any]:
    """A request body that works as it stands: what Swagger UI's "Try it out" starts from."""
    return {
        "model": settings.model_name,
        "prompt": "A red bicycle leaning on a white wall",
        "size": settings.sizes[0],
        "response_format": "b64_json",
        "steps": 8,
        "seed": 42,
    }


def edit_example(settings: Settings) -> dict[str, Any]:
    return {
        "model": settings.model_name,
        "prompt": "Make the square blue",
        "image": example_image_data_url(),
        "response_format": "b64_json",
        "steps": 8,
        "seed": 42,
    }


@functools.cache
def example_image_data_url() -> str:
    """A 64x64 picture (the smallest input an edit takes) as a data URL, so the JSON edit example runs as is."""
    picture = Image.new("RGB", (64, 64), (230, 230, 230))
    picture.paste((200, 30, 30), (16, 16, 48, 48))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
