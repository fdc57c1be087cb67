"""HTTP-agnostic orchestration of the image endpoints.

validate fields -> decode the input images and mask -> build a GenerationRequest -> engine -> encode each
image -> store it when a URL was asked for -> response body plus stage timings.

A streamed request (`stream: true`) takes the same path; the engine hands it previews on the way, which become
server-sent events (OpenAI's image streaming events), and the result becomes one `completed` event per image.
Everything that can fail before the work starts (validation, admission, a deadline passed while queued) still
fails as a plain HTTP error, because the event stream opens only once the first event is ready.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.base import GenerationRequest, PartialImages
from server import errors, images
from server.config import Settings
from server.engine import Encoding, Engine
from server.errors import InvalidRequest, ModelNotFound
from server.metrics import Metrics
from server.protocol import (
    MAX_SEED,
    EditsBody,
    GenerationsBody,
    ImageData,
    ImageFields,
    ImagesResponse,
    ImageStreamEvent,
    Usage,
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
    # Quoted in the message of an unexpected failure that reaches a client inside an event stream.
    request_id: str = "-"


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

    def _check_stream(self, fields: ImageFields) -> None:
        if fields.partial_images and not fields.stream:
            raise InvalidRequest(
                "partial_images", "partial_images needs stream: true; partial images are sent as stream events"
            )

    def json_edit_sources(self, fields: EditsBody) -> tuple[list[ImageSource], ImageSource | None]:
        """The input images and mask of a JSON edit body: `image` (a string or a list of strings) or OpenAI's
        `images: [{"image_url": ...}]`, and `mask` (a string or {"image_url": ...})."""
        if fields.image is not None and fields.images is not None:
            raise InvalidRequest("images", "send the input images as image or as images, not both")
        sources: list[ImageSource] = []
        if isinstance(fields.image, str):
            sources.append(("image", fields.image))
        elif fields.image is not None:
            sources.extend(("image", text) for text in fields.image)
        elif fields.images is not None:
            sources.extend(("images", item.image_url) for item in fields.images)
        mask = fields.mask
        mask_source = None if mask is None else ("mask", mask if isinstance(mask, str) else mask.image_url)
        return sources, mask_source

    def decode_edit_inputs(self, sources: list[ImageSource], mask_source: ImageSource | None) -> EditInputs:
        """Decode every input image (file bytes or base64 text) and the mask; each gets the checks of one image."""
        if not sources:
            raise InvalidRequest(
                "image",
                "image is required: send it as a file part named image (or image[] for several), or as base64",
                code="missing_required_parameter",
            )
        limit = self.settings.max_edit_images
        if len(sources) > limit:
            raise InvalidRequest(
                sources[0][0], f"at most {limit} input images are accepted per edit, got {len(sources)}"
            )
        pictures = []
        for position, (param, payload) in enumerate(sources):
            try:
                data = payload if isinstance(payload, bytes) else images.decode_base64_image(payload, param=param)
                pictures.append(images.decode_image(data, param=param))
            except InvalidRequest as exc:
                if len(sources) > 1:
                    exc.message = f"input image {position + 1} of {len(sources)}: {exc.message}"
                raise
        mask = None
        if mask_source is not None:
            param, payload = mask_source
            data = payload if isinstance(payload, bytes) else images.decode_base64_image(payload, param=param)
            mask = images.decode_mask(data, size=pictures[0].size, param=param)
        return EditInputs(images=pictures, mask=mask)

    # -- running ---------------------------------------------------------------------------------

    def _deliver(self, fields: ImageFields, seeds: list[int], payloads: list[bytes], base_url: str) -> list[ImageData]:
        """Each encoded image inline (b64_json) or stored behind a URL."""
        data = []
        for seed_used, payload in zip(seeds, payloads):
            if fields.response_format == "b64_json":
                data.append(ImageData(seed=seed_used, b64_json=base64.b64encode(payload).decode("ascii")))
            else:
                name = self.store.save(payload, images.file_extension(fields.output_format))
                data.append(ImageData(seed=seed_used, url=f"{base_url}/v1/images/files/{name}"))
        return data

    def _generation_request(self, fields: GenerationsBody) -> GenerationRequest:
        height, width = parse_size(fields.size)
        return self._request(fields, height=height, width=width)

    def _edit_request(self, fields: EditsBody, inputs: EditInputs) -> GenerationRequest:
        first = inputs.images[0]
        self.check_output_pixels(fields.n, first.height, first.width, param="image")
        return self._request(
            fields,
            height=first.height,
            width=first.width,
            image=first,
            references=tuple(inputs.images[1:]),
            mask=inputs.mask,
        )

    def _request(self, fields: ImageFields, **shape: Any) -> GenerationRequest:
        self._check_stream(fields)
        return GenerationRequest(
            prompt=fields.prompt,
            negative_prompt=fields.negative_prompt,
            seed=fields.seed if fields.seed is not None else secrets.randbelow(MAX_SEED + 1),
            steps=fields.steps,
            cfg_scale=fields.cfg_scale,
            text_mode=fields.text_mode,
            n=fields.n,
            partial_images=fields.partial_images if fields.stream else 0,
            **shape,
        )

    async def generate(self, fields: GenerationsBody, client: ClientContext) -> ServedImages:
        return await self._run(fields, self._generation_request(fields), client, kind="generation")

    async def edit(self, fields: EditsBody, inputs: EditInputs, client: ClientContext) -> ServedImages:
        return await self._run(fields, self._edit_request(fields, inputs), client, kind="edit")

    async def stream_generation(self, fields: GenerationsBody, client: ClientContext) -> EventStream:
        request = self._generation_request(fields)
        return await self._open_stream(fields, request, client, kind="generation")

    async def stream_edit(self, fields: EditsBody, inputs: EditInputs, client: ClientContext) -> EventStream:
        return await self._open_stream(fields, self._edit_request(fields, inputs), client, kind="edit")

    async def _run(
        self,
        fields: ImageFields,
        request: GenerationRequest,
        client: ClientContext,
        *,
        kind: str,
        on_partial: Callable[[PartialImages], None] | None = None,
    ) -> ServedImages:
        started = time.perf_counter()
        if fields.response_format == "url":
            # Refused before the engine: no compute is spent on a result that could not be stored.
            self.store.require_healthy()
        encoding = encoding_of(fields)
        outcome = await self.engine.submit(
            request,
            timeout=client.timeout,
            disconnected=client.disconnected,
            on_partial=on_partial,
            encoding=encoding,
        )
        result = outcome.result

        encode_started = time.perf_counter()

        def deliver() -> list[ImageData]:
            # PNG/JPEG encoding of several megapixels is CPU work: keep it off the event loop.
            payloads = outcome.encoded if outcome.encoded is not None else encoding.encode(result.images)
            return self._deliver(fields, result.seeds, payloads, client.base_url)

        data = await asyncio.to_thread(deliver)
        timings = {"queue": outcome.queue_ms, **result.timings_ms}
        # An engine that encoded the images itself reported that time as encode_image: both parts count.
        timings["encode_image"] = timings.get("encode_image", 0.0) + (time.perf_counter() - encode_started) * 1000
        timings["total"] = (time.perf_counter() - started) * 1000

        self.metrics.images.labels(kind).inc(len(data))
        self.metrics.observe_stages(timings)
        counted = result.details.get("usage", {})
        usage = Usage.of(
            text_tokens=counted.get("text_tokens", 0),
            image_tokens=counted.get("image_tokens", 0),
            output_tokens=counted.get("output_tokens", 0),
        )
        body = ImagesResponse(
            created=int(time.time()),
            data=data,
            usage=usage,
            output_format=fields.output_format,
            # An edit's images have its input's size, which is the request's.
            size=f"{request.height}x{request.width}",
        ).to_wire()
        return ServedImages(body=body, timings_ms=timings)

    async def _open_stream(
        self, fields: ImageFields, request: GenerationRequest, client: ClientContext, *, kind: str
    ) -> EventStream:
        """Start the request and wait for its first event; what fails before that raises here, as for any request."""
        events: asyncio.Queue[PartialImages] = asyncio.Queue()
        probe = _ClientProbe(client.disconnected) if client.disconnected is not None else None
        client = dataclasses.replace(client, disconnected=probe)
        running = asyncio.create_task(self._run(fields, request, client, kind=kind, on_partial=events.put_nowait))
        first_preview = asyncio.create_task(events.get())
        try:
            await asyncio.wait({running, first_preview}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            running.cancel()
            first_preview.cancel()
            raise
        first = None
        if first_preview.done():
            first = first_preview.result()
        else:
            first_preview.cancel()
            # Finished (or failed) before any preview: a failure here is an ordinary HTTP error response.
            running.result()
        return EventStream(fields, kind, request.seeds, running, events, first, self.metrics, client.request_id, probe)


class _ClientProbe:
    """A streamed request's disconnect probe, shared by the engine's watcher and the event stream so that a client
    who leaves is counted once in `cancellations`, by whichever notices first: the watcher when the probe answers
    True, the stream when its iteration is closed. Once the stream has counted, the probe answers False."""

    def __init__(self, disconnected: Callable[[], Awaitable[bool]]) -> None:
        self._disconnected = disconnected
        self.reported = False
        self.silenced = False

    async def __call__(self) -> bool:
        if self.silenced:
            return False
        gone = await self._disconnected() and not self.silenced
        self.reported = self.reported or gone
        return gone

    def claim(self) -> bool:
        """True, once, for the stream to count the client's leaving, unless the engine's watcher already has."""
        first = not self.reported and not self.silenced
        self.silenced = True
        return first


# One input image as the client sent it: (the field it came in, file bytes or base64/data-URL text).
ImageSource = tuple[str, "bytes | str"]


@dataclass(frozen=True)
class EditInputs:
    """An edit's decoded inputs: the edited image first, then further references; the mask is mode "L"."""

    images: list[Image.Image]
    mask: Image.Image | None = None


class EventStream:
    """A started request's server-sent events: its previews as they come, then one completed event per image.

    Iterating yields encoded SSE frames. Closing the iteration early (the client went away) cancels the request,
    which the engine stops at its next step. A failure after the stream opened is sent as an `error` event in the
    API's error envelope, which the openai SDKs raise.
    """

    def __init__(
        self,
        fields: ImageFields,
        kind: str,
        seeds: list[int],
        running: asyncio.Task[ServedImages],
        previews: asyncio.Queue[PartialImages],
        first: PartialImages | None,
        metrics: Metrics,
        request_id: str = "-",
        probe: _ClientProbe | None = None,
    ) -> None:
        self.fields = fields
        self.prefix = "image_generation" if kind == "generation" else "image_edit"
        # Previews come before the result that reports the seeds; they follow from the request.
        self.seeds = seeds
        self.running = running
        self.previews = previews
        self.first = first
        self.metrics = metrics
        self.request_id = request_id
        self.probe = probe

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[bytes]:
        next_preview: asyncio.Task[PartialImages] | None = None
        client_left = False
        try:
            if self.first is not None:
                for frame in await asyncio.to_thread(self._preview_frames, self.first):
                    yield frame
            while True:
                next_preview = asyncio.create_task(self.previews.get())
                await asyncio.wait({self.running, next_preview}, return_when=asyncio.FIRST_COMPLETED)
                if not next_preview.done():
                    break
                for frame in await asyncio.to_thread(self._preview_frames, next_preview.result()):
                    yield frame
            # Previews handed over just before the result are still worth sending, in order.
            while not self.previews.empty():
                for frame in await asyncio.to_thread(self._preview_frames, self.previews.get_nowait()):
                    yield frame
            for frame in self._completed_frames(self.running.result()):
                yield frame
        except (GeneratorExit, asyncio.CancelledError):
            # The iteration was closed (or its task cancelled) before the end: the client went away.
            client_left = True
            raise
        except errors.ApiError as exc:
            yield _frame("error", errors.to_response(exc).body)
        except Exception:
            logger.exception("request_id=%s streamed request failed", self.request_id)
            yield _frame("error", errors.to_response(errors.internal_error(self.request_id)).body)
        finally:
            if next_preview is not None and not next_preview.done():
                # Left pending, the queue read would be destroyed with the stream and logged as an error.
                next_preview.cancel()
            if not self.running.done():
                # Nobody will read the result (the client left, or the stream already failed): the engine stops the
                # job at its next step.
                self.running.cancel()
                if client_left and (self.probe is None or self.probe.claim()):
                    self.metrics.cancellations.inc()
            elif not self.running.cancelled():
                # Collected here so that a failure nobody could be told about is not reported as never retrieved.
                self.running.exception()

    def _preview_frames(self, partial: PartialImages) -> list[bytes]:
        fields = self.fields
        frames = []
        payloads = encoding_of(fields).encode(partial.images)
        for image_index, (picture, payload) in enumerate(zip(partial.images, payloads)):
            event = ImageStreamEvent(
                type=f"{self.prefix}.partial_image",  # type: ignore[arg-type]
                created_at=int(time.time()),
                size=_size_of(picture),
                output_format=fields.output_format,
                seed=self.seeds[image_index],
                image_index=image_index,
                b64_json=base64.b64encode(payload).decode("ascii"),
                partial_image_index=partial.index,
            )
            frames.append(_frame(event.type, event.to_wire()))
        return frames

    def _completed_frames(self, served: ServedImages) -> list[bytes]:
        body = served.body
        frames = []
        for image_index, item in enumerate(body["data"]):
            event = ImageStreamEvent(
                type=f"{self.prefix}.completed",  # type: ignore[arg-type]
                created_at=body["created"],
                size=body["size"],
                output_format=body["output_format"],
                seed=item["seed"],
                image_index=image_index,
                b64_json=item.get("b64_json"),
                url=item.get("url"),
                usage=Usage.model_validate(body["usage"]),
                timings={stage: round(value, 1) for stage, value in served.timings_ms.items()},
            )
            frames.append(_frame(event.type, event.to_wire()))
        return frames


def encoding_of(fields: ImageFields) -> Encoding:
    """How the client asked for its images (and previews) to be encoded."""
    return Encoding(fields.output_format, fields.output_compression)


def _frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _size_of(picture: Image.Image) -> str:
    """HEIGHTxWIDTH, the way the API's size field is written."""
    return f"{picture.height}x{picture.width}"


def server_timing(timings_ms: dict[str, float]) -> str:
    """The `server-timing` header value: each stage's duration in milliseconds."""
    return ", ".join(f"{stage};dur={value:.1f}" for stage, value in timings_ms.items())
