"""The plain values a backend takes and returns, and the Backend protocol.

Nothing here knows about HTTP: a benchmark or a notebook builds a `GenerationRequest`, hands it to a
backend and gets PIL images and stage timings back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

SEED_RANGE = 2**31


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image or edit job; `image` set means an edit.

    Image i of the `n` images uses seed `seed + i`, so an n-image request gives the same pixels as n
    single-image requests with those seeds.
    """

    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 8
    cfg_scale: float = 1.0
    height: int = 1024
    width: int = 1024
    text_mode: bool = False
    # The picture being edited: the result has its size, and `mask` applies to it.
    image: Image.Image | None = None
    n: int = 1
    # Further reference images for an edit (the prompt may refer to them as "image 2", ...).
    references: tuple[Image.Image, ...] = ()
    # Mode "L" at the edited image's size: 255 marks pixels to regenerate, 0 pixels to keep exactly.
    mask: Image.Image | None = None
    # Previews of the predicted final image to hand to `progress` at evenly spaced steps.
    partial_images: int = 0

    @property
    def is_edit(self) -> bool:
        return self.image is not None

    @property
    def images(self) -> tuple[Image.Image, ...]:
        """Every input image, the edited one first."""
        return () if self.image is None else (self.image, *self.references)

    @property
    def seeds(self) -> list[int]:
        # Wrap inside the API's seed range so that every reported seed can be sent back as-is.
        return [(self.seed + i) % SEED_RANGE for i in range(self.n)]


@dataclass
class GenerationResult:
    """Images (one per seed, at the requested size or, for edits, the input's exact size) and what it cost."""

    images: list[Image.Image]
    seeds: list[int]
    # Milliseconds per stage: encode_prompt, denoise, decode (summed over the n images).
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What the backend actually did, for logs and tests: working size, transformer passes per step, ...
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartialImages:
    """A preview of one request's images while they are being made: the model's current estimate of the final
    images (one per requested image, in seed order), taken after denoising step `step` of `steps`."""

    index: int
    images: list[Image.Image]
    step: int = 0
    steps: int = 0


# Called on the backend's thread with (index of the request in the batch, its preview).
ProgressCallback = Callable[[int, PartialImages], None]


class Cancelled(Exception):
    """Raised inside a backend when the caller's cancel event is set (deadline passed, shutdown)."""


@dataclass(frozen=True)
class BackendInfo:
    """What /v1/models and the logs say about the loaded model."""

    backend: str
    model: str
    device: str
    dtype: str
    random_weights: bool = False
    notes: tuple[str, ...] = ()


class Backend(Protocol):
    """A loaded model that turns requests into images. Not thread-safe: the engine calls it from one thread."""

    info: BackendInfo

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> GenerationResult: ...

    # Optional: `generate_batch(requests, cancel=None, progress=None) -> list[GenerationResult]` runs requests of one
    # `batch_key(request)` as a single call and reports previews through `progress` (a ProgressCallback). Its
    # `cancel` may also offer `request_cancelled(index) -> bool`: a request gone from a batch that runs on for the
    # others gets no more previews.

    def warm_up(self, sizes: list[tuple[int, int]], progress: Callable[[str], None] | None = None) -> None: ...


class ModelLoadError(Exception):
    """Weights missing, incomplete or of the wrong model; the message says which file, where, and how to fix it."""
