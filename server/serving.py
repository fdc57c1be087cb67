"""HTTP-agnostic orchestration of the image endpoints.

validate fields -> decode the input image -> build a GenerationRequest -> engine -> encode each
image -> store it when a URL was asked for -> response body plus stage timings.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.base import GenerationRequest
from server import images
from server.config import Settings
from server.engine import Engine
from server.errors import InvalidRequest, ModelNotFound
from server.metrics import Metrics
from server.protocol import (
    MAX_SEED,
    EditsBody,
    GenerationsBody,
    ImageData,
    ImageFields,
    ImagesResponse,
    parse_fields,
    parse_size,
    quoted,
)
from server.storage import ResultStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientContext:
    """What serving needs to know about the caller, without knowing HTTP."""

    base_url: str
    # Seconds the client is willing to wait (it may ask for less than the server's limit).
    timeout: float | None = None
    # Polled while the request waits; True once the client has gone away.
    disconnected: Callable[[], Awaitable[bool]] | None = None


@dataclass
class ServedImages:
    body: dict[str, Any]
    timings_ms: dict[str, float]


class ImageService:
    def __init__(self, settings: Settings, engine: Engine, store: ResultStore, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = metrics

    # -- validation ------------------------------------------------------------------------------

    def _check_common(self, fields: ImageFields) -> None:
        if fields.model is not None and fields.model not in self.settings.model_names:
            raise ModelNotFound(
                f"The model {quoted(fields.model)} does not exist; this server serves "
                + ", ".join(self.settings.model_names)
            )
        if fields.n > self.settings.max_n:
            raise InvalidRequest("n", f"n must be an integer between 1 and {self.settings.max_n}, got {fields.n}")
        if fields.output_compression is not None and fields.output_format == "png":
            raise InvalidRequest(
                "output_compression",
                "output_compression sets jpeg/webp quality; it does not apply to output_format png",
            )

    def parse_generation(self, raw: dict[str, Any]) -> GenerationsBody:
        fields = parse_fields(GenerationsBody, raw)
        assert isinstance(fields, GenerationsBody)
        self._check_common(fields)
        if fields.size not in self.settings.sizes:
            served = ", ".join(self.settings.sizes)
            raise InvalidRequest("size", f"size must be one of {served} (HEIGHTxWIDTH), got {quoted(fields.size)}")
        self.check_output_pixels(fields.n, *parse_size(fields.size), param="size")
        return fields

    def parse_edit(self, raw: dict[str, Any], *, form: bool = False) -> EditsBody:
        fields = parse_fields(EditsBody, raw, form=form)
        assert isinstance(fields, EditsBody)
        self._check_common(fields)
        return fields

    def check_output_pixels(self, n: int, height: int, width: int, *, param: str) -> None:
        """Refuse, before any work, a request whose n images of height x width add up to more than
        --max-output-pixels; `param` names what sets one image's size (size, or the edited image)."""
        limit = self.settings.max_output_pixels
        each = height * width
        if n * each <= limit:
            return
        rule = f"this server makes at most {limit:,} output pixels per request"
        one = f"{width} pixels wide and {height} high ({each:,} pixels)"
        if each > limit:
            source = "an image of that size is" if param == "size" else "the result keeps the input's size,"
            raise InvalidRequest(param, f"{param} is too large: {source} {one}, and {rule}")
        raise InvalidRequest(
            "n",
            f"n is too large: {n} images {one} each make {n * each:,} pixels, and {rule}; "
            f"at this size n may be at most {limit // each}",
        )

    @staticmethod
    def decode_input(data: bytes | None, text: str | None) -> Image.Image:
        """The edit's input image from a file part's bytes or a base64 / data-URL string."""
        if data is None and text is None:
            raise InvalidRequest(
                "image",
                "image is required: send it as a file part named image, or as base64",
                code="missing_required_parameter",
            )
        if data is None:
            data = images.decode_base64_image(text or "", param="image")
        return images.decode_image(data, param="image")

    # -- running ---------------------------------------------------------------------------------

    def _encode_all(
        self, fields: ImageFields, seeds: list[int], pictures: list[Image.Image], base_url: str
    ) -> list[ImageData]:
        data = []
        for seed_used, picture in zip(seeds, pictures):
            payload = images.encode_image(picture, fields.output_format, fields.output_compression)
            if fields.response_format == "b64_json":
                data.append(ImageData(seed=seed_used, b64_json=base64.b64encode(payload).decode("ascii")))
            else:
                name = self.store.save(payload, images.file_extension(fields.output_format))
                data.append(ImageData(seed=seed_used, url=f"{base_url}/v1/images/files/{name}"))
        return data

    async def generate(self, fields: GenerationsBody, client: ClientContext) -> ServedImages:
        height, width = parse_size(fields.size)
        return await self._run(fields, client, kind="generation", height=height, width=width, image=None)

    async def edit(self, fields: EditsBody, image: Image.Image, client: ClientContext) -> ServedImages:
        self.check_output_pixels(fields.n, image.height, image.width, param="image")
        return await self._run(fields, client, kind="edit", height=image.height, width=image.width, image=image)

    async def _run(
        self,
        fields: ImageFields,
        client: ClientContext,
        *,
        kind: str,
        height: int,
        width: int,
        image: Image.Image | None,
    ) -> ServedImages:
        started = time.perf_counter()
        seed = fields.seed if fields.seed is not None else secrets.randbelow(MAX_SEED + 1)
        request = GenerationRequest(
            prompt=fields.prompt,
            negative_prompt=fields.negative_prompt,
            seed=seed,
            steps=fields.steps,
            cfg_scale=fields.cfg_scale,
            height=height,
            width=width,
            text_mode=fields.text_mode,
            image=image,
            n=fields.n,
        )
        outcome = await self.engine.submit(request, timeout=client.timeout, disconnected=client.disconnected)
        result = outcome.result

        encode_started = time.perf_counter()
        # PNG/JPEG encoding of several megapixels is CPU work: keep it off the event loop.
        data = await asyncio.to_thread(self._encode_all, fields, result.seeds, result.images, client.base_url)
        timings = {"queue": outcome.queue_ms, **result.timings_ms}
        timings["encode_image"] = (time.perf_counter() - encode_started) * 1000
        timings["total"] = (time.perf_counter() - started) * 1000

        self.metrics.images.labels(kind).inc(len(data))
        self.metrics.observe_stages(timings)
        body = ImagesResponse(created=int(time.time()), data=data).to_wire()
        return ServedImages(body=body, timings_ms=timings)


def server_timing(timings_ms: dict[str, float]) -> str:
    """The `server-timing` header value: each stage's duration in milliseconds."""
    return ", ".join(f"{stage};dur={value:.1f}" for stage, value in timings_ms.items())
