"""Wire models of the image API: request fields with their defaults and ranges, responses, and how a
validation failure becomes one clear `InvalidRequest` naming the field.

The same models validate JSON bodies and multipart form fields (whose values all arrive as strings,
so numbers and booleans are coerced: `text_mode` accepts true/false/1/0 in any case).
"""

from __future__ import annotations

from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import InvalidRequest

MAX_PROMPT_CHARS = 512
MAX_SEED = 2_147_483_647
MAX_PARTIAL_IMAGES = 3
OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["url", "b64_json"]

# The hosted API's sizes, written height x width.
DEFAULT_SIZES = ("1024x1024", "768x1360", "896x1184", "1360x768", "1184x896")
DEFAULT_SIZE = "1024x1024"


class ImageFields(BaseModel):
    """Fields shared by generations and edits. Unknown fields (OpenAI's `user`, `quality`, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Served model name; absent means the default model.")
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS, description="What to generate or how to edit.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="Used only when cfg_scale > 1.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Absent: the server draws one and returns it.")
    steps: int = Field(8, ge=1, le=50, description="Denoising steps.")
    cfg_scale: float = Field(1.0, ge=1.0, le=10.0, description="1.0 disables classifier-free guidance.")
    text_mode: bool = Field(False, description="Favour legible rendered text (see the backend's docs).")
    response_format: ResponseFormat = Field("url", description="A stored file's URL, or the image inline.")
    n: int = Field(1, ge=1, description="Images per request (extension); image i uses seed + i.")
    output_format: OutputFormat = Field("png", description="Extension: png, jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100, description="Extension: jpeg/webp quality.")
    stream: bool = Field(
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

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank")
        return value


class GenerationsBody(ImageFields):
    size: str = Field(DEFAULT_SIZE, description="HEIGHTxWIDTH, one of the served sizes.")


class ImageURL(BaseModel):
    """OpenAI's JSON shape for an input image."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(..., description="The image as a data URL (data:image/png;base64,...) or plain base64.")


class EditsBody(ImageFields):
    # Accepted and ignored: an edit returns the input's own size.
    size: str | None = Field(None, description="Ignored for edits: the result has the input's size.")
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


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(..., description="Prompt tokens the text encoder read (and the negative prompt's).")
    image_tokens: int = Field(..., description="Latent tokens of the input images the model attended to.")


class Usage(BaseModel):
    """What the model processed, in tokens: 16x16-pixel latent patches for images, tokenizer tokens for text."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(..., description="Latent tokens of the images made (all n of them).")
    total_tokens: int

    @classmethod
    def of(cls, text_tokens: int, image_tokens: int, output_tokens: int) -> Usage:
        return cls(
            input_tokens=text_tokens + image_tokens,
            input_tokens_details=InputTokensDetails(text_tokens=text_tokens, image_tokens=image_tokens),
            output_tokens=output_tokens,
            total_tokens=text_tokens + image_tokens + output_tokens,
        )


class ImageData(BaseModel):
    seed: int
    finish_reason: Literal["success", "content_filtered"] = "success"
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    usage: Usage
    output_format: OutputFormat
    size: str = Field(..., description="HEIGHTxWIDTH of the images made, as the request's size is written.")

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
    ]
    created_at: int
    size: str = Field(..., description="HEIGHTxWIDTH, as the request's size is written.")
    output_format: OutputFormat
    seed: int
    # Which of the request's n images this event is about (extension; always 0 when n is 1).
    image_index: int = 0
    b64_json: str | None = Field(None, description="The image; on completed events only with b64_json.")
    url: str | None = Field(None, description="Completed events of a response_format=url request.")
    partial_image_index: int | None = Field(None, description="0-based index of a partial image.")
    usage: Usage | None = Field(None, description="On completed events.")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _field_rule(model: type[BaseModel], name: str) -> str:
    """Describe a field's rule from its declaration, e.g. 'an integer between 1 and 50'."""
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
        return "a boolean (true or false)"
    kind = "an integer" if "int" in annotation else "a number" if "float" in annotation else "a string"
    if lower is not None and upper is not None:
        return f"{kind} between {lower} and {upper}"
    if lower is not None:
        return f"{kind} of at least {lower}"
    return kind


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error_to_invalid_request(model: type[BaseModel], error: ValidationError) -> InvalidRequest:
    """The first problem of a failed validation, as a message that quotes the value and the rule."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else None
    if name is None or name not in model.model_fields:
        return InvalidRequest(name, first.get("msg", "invalid request"))
    if first["type"] == "missing":
        return InvalidRequest(name, f"{name} is required", code="missing_required_parameter")
    value = first.get("input")
    if name == "prompt" and isinstance(value, str):
        if not value.strip():
            return InvalidRequest(name, "prompt must not be blank")
        if len(value) > MAX_PROMPT_CHARS:
            return InvalidRequest(name, f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    if name == "negative_prompt" and isinstance(value, str) and len(value) > MAX_PROMPT_CHARS:
        return InvalidRequest(name, f"negative_prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    return InvalidRequest(name, f"{name} must be {_field_rule(model, name)}, got {_shown(value)}")


def parse_fields(model: type[ImageFields], raw: dict[str, Any]) -> ImageFields:
    """Validate raw fields; JSON nulls count as absent, so defaults apply."""
    cleaned = {key: value for key, value in raw.items() if value is not None}
    try:
        return model.model_validate(cleaned)
    except ValidationError as exc:
        raise validation_error_to_invalid_request(model, exc) from None


def parse_size(size: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' -> (height, width)."""
    height, _, width = size.lower().partition("x")
    return int(height), int(width)
