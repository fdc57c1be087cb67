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

    @field_validator("seed", "steps", "n", "output_compression", "cfg_scale", mode="before")
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


class EditsBody(ImageFields):
    # Accepted and ignored: an edit returns the input's own size.
    size: str | None = Field(None, description="Ignored for edits: the result has the input's size.")
    image: str | None = Field(None, description="Base64 or data URL, when not sent as a file part.")


class ImageData(BaseModel):
    seed: int
    finish_reason: Literal["success", "content_filtered"] = "success"
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]

    def to_wire(self) -> dict[str, Any]:
        # Exactly one of b64_json / url per item: drop the absent one rather than sending null.
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
