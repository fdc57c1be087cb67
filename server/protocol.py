"""Wire models of the image API: request fields with their defaults and ranges, responses, the error envelope,
and how a validation failure becomes one clear `InvalidRequest` naming the field.

The same models validate JSON bodies and form fields, and are the source of the OpenAPI schema (server/openapi.py).
Form values all arrive as strings, so numbers are coerced from text; booleans are strict: JSON true/false, and in a
form only true/false/1/0 in any case (`parse_fields(..., form=True)`). Messages quote a client's value through
`quoted`, which bounds its length whatever the client sent.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from server.errors import InvalidRequest
from server.images import DEFAULT_QUALITY

MAX_PROMPT_CHARS = 512
MAX_SEED = 2_147_483_647
MAX_PARTIAL_IMAGES = 3
OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["url", "b64_json"]

# The hosted API's sizes, written height x width.
DEFAULT_SIZES = ("1024x1024", "768x1360", "896x1184", "1360x768", "1184x896")
DEFAULT_SIZE = "1024x1024"
# What a well-formed size looks like on either endpoint; which sizes a generation may use is configuration.
SIZE_PATTERN = r"^[0-9]{1,5}[xX][0-9]{1,5}$"
# Edits ignore size (the result has the input's size), so OpenAI's "auto" is as good as any well-formed size.
EDIT_SIZE_PATTERN = r"^(auto|[0-9]{1,5}[xX][0-9]{1,5})$"
# The longest piece of a client's value that a message quotes back.
QUOTED_CHARS = 64

FORM_TRUE = ("true", "1")
FORM_FALSE = ("false", "0")
BOOLEAN_RULE = "true or false (in a form: true, false, 1 or 0, in any case)"


def quoted(value: Any) -> str:
    """A client's value as an error message shows it: JSON-style, at most QUOTED_CHARS characters of text, and never
    a container's contents (a 100,000-character model name or a deeply nested array stays a short message)."""
    if isinstance(value, str):
        shown = value if len(value) <= QUOTED_CHARS else value[:QUOTED_CHARS] + "..."
        # Lone surrogates cannot be encoded in the UTF-8 response: show them as escapes.
        text = json.dumps(shown, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
        return text if len(value) <= QUOTED_CHARS else f"{text} ({len(value)} characters)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= QUOTED_CHARS else f"a {len(text)}-digit number"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _wire_boolean(value: Any, info: ValidationInfo) -> Any:
    """A boolean is JSON true/false; in a form, where every value is text, true/false/1/0 in any case. pydantic alone
    would also take yes/on/t/y and 1/0 numbers, which the contract does not promise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and (info.context or {}).get("form"):
        lowered = value.lower()
        if lowered in FORM_TRUE:
            return True
        if lowered in FORM_FALSE:
            return False
    raise PydanticCustomError("wire_boolean", "not a boolean")


WireBool = Annotated[bool, BeforeValidator(_wire_boolean)]
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class ImageFields(BaseModel):
    """Fields shared by generations and edits. Unknown fields (OpenAI's `user`, `quality`, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None, description="A served model name (step-image-edit-2 unless configured); absent: the default model."
    )
    prompt: str = Field(
        ...,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What to generate or how to edit; not blank. Characters are Unicode code points.",
        examples=["A red bicycle leaning on a white wall"],
    )
    negative_prompt: str = Field(
        "", max_length=MAX_PROMPT_CHARS, description="What to steer away from; used only when cfg_scale > 1."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Same seed, same request: same pixels. Absent: drawn at random, returned."
    )
    steps: int = Field(8, ge=1, le=50, description="Denoising steps: more is slower and usually finer.")
    cfg_scale: float = Field(
        1.0, ge=1.0, le=10.0, description="Classifier-free guidance; 1.0 turns it off (one model pass per step)."
    )
    text_mode: WireBool = Field(
        False,
        description="Favour legible rendered text: quoted text in the prompt is rendered verbatim, and edits work at "
        "the full 1 MP. In a form: true, false, 1 or 0, in any case.",
    )
    response_format: ResponseFormat = Field(
        "url", description="url: a link to the stored file (no key needed, expires); b64_json: the image inline."
    )
    n: int = Field(
        1,
        ge=1,
        description="Extension: images per request (at most --max-n, and --max-output-pixels in all); "
        "image i uses seed + i.",
    )
    output_format: OutputFormat = Field("png", description="Extension: the images' file format.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description=f"Extension: jpeg/webp quality (an error with png); absent: {DEFAULT_QUALITY}."
    )
    stream: WireBool = Field(
        False, description="Extension (OpenAI's streaming): answer with server-sent events instead of one JSON body."
    )
    partial_images: int = Field(
        0,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="Extension, with stream: previews of the final image sent at evenly spaced steps (fewer when "
        "there are fewer steps than previews).",
    )

    @field_validator("seed", "steps", "n", "output_compression", "cfg_scale", "partial_images", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any) -> Any:
        # pydantic would read true as 1; a boolean in a numeric field is a client bug worth reporting.
        if isinstance(value, bool):
            raise ValueError("boolean given for a number")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _text_is_unicode(cls, value: Any) -> Any:
        # JSON can spell a lone surrogate (\\ud800) that is no character at all: say so, rather than letting it
        # fail some other rule (it used to be reported as too long) or reach the tokenizer.
        if isinstance(value, str) and _SURROGATE.search(value):
            raise PydanticCustomError("text_encoding", "not valid Unicode text")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank")
        return value


def _lowercase_size(value: str | None) -> str | None:
    # 1024X1024 is well formed (SIZE_PATTERN), and the same size as 1024x1024: the served sizes are written with a
    # lowercase x, and so is every size the API writes back.
    return value.lower() if value is not None else None


class GenerationsBody(ImageFields):
    size: str = Field(
        DEFAULT_SIZE,
        pattern=SIZE_PATTERN,
        description="HEIGHTxWIDTH (768x1360 is 1360 wide), one of the served sizes; the x may be upper case.",
    )

    _size_case = field_validator("size")(_lowercase_size)


class ImageURL(BaseModel):
    """OpenAI's JSON shape for an input image."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(..., description="The image as a data URL (data:image/png;base64,...) or plain base64.")


class EditsBody(ImageFields):
    # Accepted and ignored: an edit returns the input's own size.
    size: str | None = Field(
        None,
        pattern=EDIT_SIZE_PATTERN,
        description="Accepted and ignored, as by the hosted API: the result has the input's size. HEIGHTxWIDTH or "
        "auto; a malformed size is an error.",
    )
    image: str | list[str] | None = Field(
        None,
        description="The image to edit, base64 or a data URL (in multipart: file parts named image or image[]). "
        "A list adds reference images after the first; the result has the first image's size.",
    )
    images: list[ImageURL] | None = Field(
        None,
        description="OpenAI's JSON shape for the input images: the first is edited, the others are references.",
    )
    mask: str | ImageURL | None = Field(
        None,
        description="A PNG with alpha, the first image's size: fully transparent pixels mark the area to change; "
        'every other pixel is kept exactly. Base64, a data URL, {"image_url": ...} or a file part.',
    )

    _size_case = field_validator("size")(_lowercase_size)


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(..., description="Prompt tokens the text encoder read (and the negative prompt's).")
    image_tokens: int = Field(..., description="Latent tokens of the input images the model attended to.")


class Usage(BaseModel):
    """What the model processed, in tokens: 16x16-pixel latent patches for images, tokenizer tokens for text."""

    input_tokens: int = Field(..., description="text_tokens + image_tokens.")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(..., description="Latent tokens of the images made (all n of them).")
    total_tokens: int = Field(..., description="input_tokens + output_tokens.")

    @classmethod
    def of(cls, text_tokens: int, image_tokens: int, output_tokens: int) -> Usage:
        return cls(
            input_tokens=text_tokens + image_tokens,
            input_tokens_details=InputTokensDetails(text_tokens=text_tokens, image_tokens=image_tokens),
            output_tokens=output_tokens,
            total_tokens=text_tokens + image_tokens + output_tokens,
        )


class ImageData(BaseModel):
    seed: int = Field(..., description="The seed this image was made with (the request's seed + its index).")
    finish_reason: Literal["success", "content_filtered"] = Field(
        "success", description="content_filtered when a configured content filter blocked the image."
    )
    b64_json: str | None = Field(None, description="The image, base64-encoded (response_format b64_json).")
    url: str | None = Field(None, description="Where to download the image, no key needed (response_format url).")


class ImagesResponse(BaseModel):
    created: int = Field(..., description="Unix time the response was made.")
    data: list[ImageData] = Field(..., description="One item per image, in seed order.")
    usage: Usage = Field(..., description="What the model processed for this request.")
    output_format: OutputFormat = Field(..., description="The images' file format.")
    size: str = Field(..., description="HEIGHTxWIDTH of the images made, with a lower-case x.")

    def to_wire(self) -> dict[str, Any]:
        # Exactly one of b64_json / url per item: drop the absent one rather than sending null.
        return self.model_dump(exclude_none=True)


class ImageStreamEvent(BaseModel):
    """One server-sent event of a streamed request (OpenAI's image streaming events, plus `seed`)."""

    type: Literal[
        "image_generation.partial_image",
        "image_generation.completed",
        "image_edit.partial_image",
        "image_edit.completed",
    ] = Field(..., description="The event's name, also sent as its SSE event field.")
    created_at: int = Field(..., description="Unix time the event was made.")
    size: str = Field(..., description="HEIGHTxWIDTH of the image, with a lower-case x.")
    output_format: OutputFormat = Field(..., description="The image's file format.")
    seed: int = Field(..., description="The seed of the image this event is about.")
    image_index: int = Field(
        0, description="Extension: which of the request's n images this event is about (0 when n is 1)."
    )
    b64_json: str | None = Field(None, description="The image; on completed events only with b64_json.")
    url: str | None = Field(None, description="Completed events of a response_format=url request.")
    partial_image_index: int | None = Field(None, description="0-based index of a partial image.")
    usage: Usage | None = Field(None, description="On completed events.")
    timings: dict[str, float] | None = Field(
        None,
        description="Extension, on completed events: milliseconds per stage (queue, encode_prompt, denoise, "
        "previews, decode, encode_image, total), what a response without streaming carries in its server-timing "
        "header; a stream's headers leave before the work is done.",
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(..., description="What went wrong, for a person.")
    type: str = Field(..., description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(..., description="The request field at fault, when there is one.")
    code: str | None = Field(..., description="A stable machine-readable code, e.g. invalid_value, model_not_found.")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: the body of every error response (server/errors.py builds it)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def _field_rule(model: type[BaseModel], name: str) -> str:
    """Describe a field's rule from its declaration, e.g. 'an integer between 1 and 50'."""
    if name in IMAGE_FIELD_RULES:
        return IMAGE_FIELD_RULES[name]
    info = model.model_fields[name]
    lower = upper = None
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            lower = meta.ge
        elif isinstance(meta, annotated_types.Le):
            upper = meta.le
        elif isinstance(meta, annotated_types.MaxLen):
            return f"a string of at most {meta.max_length} characters"
    annotation = str(info.annotation)
    if "Literal" in annotation:
        choices = info.annotation.__args__ if hasattr(info.annotation, "__args__") else ()
        return "one of " + ", ".join(str(choice) for choice in choices)
    if "bool" in annotation:
        return BOOLEAN_RULE
    kind = "an integer" if "int" in annotation else "a number" if "float" in annotation else "a string"
    if lower is not None and upper is not None:
        return f"{kind} between {lower} and {upper}"
    if lower is not None:
        return f"{kind} of at least {lower}"
    return kind


# What the edit fields that carry images accept, as validation messages state it (the shapes declared on EditsBody
# and ImageURL).
IMAGE_TEXT = "a base64-encoded image or data URL string"
IMAGE_OBJECT = '{"image_url": "<base64 or data URL>"}'
IMAGE_FIELD_RULES = {
    "image": f"{IMAGE_TEXT}, or an array of them",
    "images": f"an array of objects {IMAGE_OBJECT} (in a JSON body; a form sends image or image[] parts)",
    "mask": f"{IMAGE_TEXT}, or an object {IMAGE_OBJECT}",
}
# OpenAI's other shape for an input image refers to a file uploaded to its Files API, which this server does not have.
FILE_ID = "file_id"


def _path(loc: tuple) -> str:
    """('images', 0, 'image_url') -> 'images[0].image_url'."""
    text = str(loc[0])
    for part in loc[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _json_kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "array" if isinstance(value, list) else "object"


def _union_member_kind(tag: str) -> str:
    # pydantic tags each union member's errors with the member's name: str, list[str], ImageURL.
    return "text" if tag == "str" else "array" if tag.startswith("list") else "object"


def _image_field_problem(model: type[BaseModel], name: str, value: Any, errors: list[Any]) -> InvalidRequest:
    """What is wrong with an image, images or mask value, named by its path inside the value (images[0].image_url);
    `param` stays the field's name.

    A union field (image: text or array; mask: text or object) fails on every member; only the member of the value's
    own JSON type says what is wrong with it. A value of no accepted type gets the field's whole rule."""
    members = [arg for arg in typing.get_args(model.model_fields[name].annotation) if arg is not type(None)]
    union = len(members) > 1
    problems = []
    for error in errors:
        loc = tuple(error["loc"])
        if loc[0] != name:
            continue
        if union:
            if len(loc) < 2 or _union_member_kind(str(loc[1])) != _json_kind(value):
                continue
            loc = (name, *loc[2:])
        problems.append((loc, error["type"], error.get("input")))
    whole_rule = InvalidRequest(name, f"{name} must be {_field_rule(model, name)}, got {quoted(value)}")
    for loc, kind, _ in problems:
        if kind == "extra_forbidden" and loc[-1] == FILE_ID:
            return InvalidRequest(
                name,
                f"{_path(loc)} refers to a file uploaded to OpenAI's Files API, which this server does not have; "
                f"send the image itself: {IMAGE_OBJECT}",
                code="unsupported_parameter",
            )
    # A missing key first, then a key that does not belong: they say most about the shape the client meant.
    problems.sort(key=lambda problem: (problem[1] != "missing", problem[1] != "extra_forbidden"))
    if not problems or len(problems[0][0]) == 1:
        return whole_rule
    loc, kind, got = problems[0]
    if kind == "missing":
        return InvalidRequest(name, f"{_path(loc)} is required", code="missing_required_parameter")
    if kind == "extra_forbidden":
        return InvalidRequest(name, f"{_path(loc[:-1])} has an unknown key {quoted(str(loc[-1]))}: send {IMAGE_OBJECT}")
    expected = IMAGE_TEXT if name == "image" or loc[-1] == "image_url" else f"an object {IMAGE_OBJECT}"
    return InvalidRequest(name, f"{_path(loc)} must be {expected}, got {quoted(got)}")


def size_malformed(value: Any) -> InvalidRequest:
    """The one message for a size that is not HEIGHTxWIDTH at all, on either endpoint."""
    return InvalidRequest("size", f"size must be HEIGHTxWIDTH, e.g. {DEFAULT_SIZE}, got {quoted(value)}")


def validation_error_to_invalid_request(
    model: type[BaseModel], error: ValidationError, raw: dict[str, Any] | None = None
) -> InvalidRequest:
    """The first problem of a failed validation, as a message that quotes the value and the rule. `raw`: the
    validated fields, which say what the client sent for a field whose problem lies inside its value."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else None
    if name is None or name not in model.model_fields:
        return InvalidRequest(name, first.get("msg", "invalid request"))
    if first["type"] == "missing" and len(first["loc"]) == 1:
        return InvalidRequest(name, f"{name} is required", code="missing_required_parameter")
    value = first.get("input")
    if first["type"] == "text_encoding":
        return InvalidRequest(
            name, f"{name} is not valid Unicode text: it contains a lone surrogate code point; send UTF-8 text"
        )
    if name in IMAGE_FIELD_RULES:
        return _image_field_problem(model, name, (raw or {}).get(name), error.errors())
    if name == "prompt" and isinstance(value, str):
        if not value.strip():
            return InvalidRequest(name, "prompt must not be blank")
        if len(value) > MAX_PROMPT_CHARS:
            return InvalidRequest(name, f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    if name == "negative_prompt" and isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
        return InvalidRequest(name, f"negative_prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    if name == "size" and first["type"] == "string_pattern_mismatch":
        return size_malformed(value)
    return InvalidRequest(name, f"{name} must be {_field_rule(model, name)}, got {quoted(value)}")


def parse_fields(model: type[ImageFields], raw: dict[str, Any], *, form: bool = False) -> ImageFields:
    """Validate raw fields; JSON nulls count as absent, so defaults apply. `form`: the values came from a form (all
    text), where a boolean may also be written 1 or 0, and an empty field counts as absent: a browser's form (and
    Swagger UI's) sends every input it shows, "" for one left empty. A blank prompt is still an error of its own."""
    cleaned = {
        key: value for key, value in raw.items() if value is not None and not (form and value == "" and key != "prompt")
    }
    try:
        return model.model_validate(cleaned, context={"form": form})
    except ValidationError as exc:
        raise validation_error_to_invalid_request(model, exc, cleaned) from None


def parse_size(size: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' -> (height, width)."""
    height, _, width = size.lower().partition("x")
    return int(height), int(width)
