"""The FLUX.2 [klein] backend: load a diffusers `Flux2KleinPipeline`, run text-to-image and edits.

What this module decides, and why:

- **Schedule**: the scheduler is rebuilt without its own shifting and every call passes the explicit
  sigmas of `pipelines.scheduling`, so the schedule is one visible function of (steps, image size).
- **cfg_scale**: at 1.0 the negative prompt is never encoded and each step is one transformer pass.
  Above 1.0 the negative prompt ("" when absent) is encoded and the pipeline runs real
  classifier-free guidance, two passes per step. The pipeline is loaded with `is_distilled=False`
  because diffusers otherwise ignores guidance for the step-distilled checkpoint; we keep that
  choice per request instead (the distilled model was trained without CFG, so `cfg_scale > 1` on it
  costs twice the compute and tends to over-saturate; the base checkpoint is the one meant for CFG).
- **Edits at any input size**: the model works near 1 megapixel in multiples of 16 pixels. The input
  is resized (and letterboxed with its own edge pixels when its aspect ratio exceeds the model's 8:1)
  to a working size; the result is resized back to exactly the input's size with a Lanczos filter.
- **text_mode**: aimed at legible rendered text, it changes two things, both observable in
  `GenerationResult.details`: (1) quoted text in the prompt ("...", “...”, «...», 「...」) is restated
  at the end of the prompt as text to render verbatim, letter for letter (and without quotes a
  legibility instruction is added), so the text encoder sees the exact strings twice and the
  glyph tokens are not lost to truncation in long prompts; (2) edits always work at the full
  1-megapixel area, upscaling small inputs, so that glyphs get enough pixels to be drawn sharply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.base import (
    BackendInfo,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    ModelLoadError,
    PartialImages,
    ProgressCallback,
)
from pipelines.scheduling import flux2_sigmas, image_tokens

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "Flux2KleinPipeline"
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The model's native working area and granularity (VAE factor 8 x 2x2 latent packing).
WORKING_AREA = 1024 * 1024
MULTIPLE = 16
MIN_WORKING_SIDE = 64
MAX_ASPECT = 8


@dataclass(frozen=True)
class ModelSpec:
    """How to drive one checkpoint family through the pipeline."""

    name: str
    # Hidden-state layers of the text encoder that form the prompt embedding.
    text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)
    max_sequence_length: int = 512


@dataclass(frozen=True)
class RunOptions:
    """Where and how the pipeline runs."""

    device: str = "cpu"
    dtype: str = "fp32"
    prompt_cache_size: int = 32
    # torch.compile the transformer's repeated blocks and the VAE decoder.
    compile: bool = False
    # torch.compile backend; tests on CPU use "aot_eager" to check graph capture without codegen time.
    compile_backend: str = "inductor"
    # diffusers attention backend name (e.g. "native", "flash", "_native_cudnn"); None keeps the default.
    attention_backend: str | None = None
    # Drop text-encoder layers after the last one the pipeline reads (exact: see trim_text_encoder).
    trim_text_encoder: bool = False
    # Record each denoising step's duration in result details (synchronizes the GPU at every step, so
    # benchmarks turn it on and serving leaves it off).
    step_timing: bool = False
    # Weight quantization of the transformer's linear layers: "none" or "fp8" (pipelines.quantize).
    quantize: str = "none"
    # Where the text encoder lives: "device", "offload" or "cpu" (pipelines.offload).
    text_encoder_placement: str = "device"


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def load_pipeline(path: Path, *, dtype: torch.dtype, device: str, text_encoder_device: str | None = None):
    """Load a diffusers-layout Flux2KleinPipeline from a local directory, never from the network.

    The pipeline is loaded with `is_distilled=False`: see the module docstring for why guidance is
    decided per request here. `text_encoder_device` keeps the text encoder elsewhere (the CPU, for
    --text-encoder-placement offload/cpu), so that it never occupies the serving device, even while
    loading. Returns (pipeline, is_distilled as the checkpoint declares it).
    """
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(
            f"no diffusers pipeline at {path}: {index_path.name} is missing. "
            "Fetch the weights with `stepimage weights pull` or point --weights-dir at a snapshot."
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index_path} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_path} is not a diffusers model index: expected a JSON object")
    class_name = index.get("_class_name")
    if class_name != PIPELINE_CLASS:
        raise ModelLoadError(
            f"wrong model at {path}: {index_path.name} says {class_name!r}, expected {PIPELINE_CLASS!r}"
        )
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"incomplete weights at {path}: missing component folder(s) {', '.join(missing)}. "
            "Run `stepimage weights verify` to list every missing file."
        )
    _check_weight_files(path)
    try:
        pipe = Flux2KleinPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, is_distilled=False)
    except Exception as exc:  # diffusers and safetensors raise many types; all mean "this checkpoint is broken"
        raise ModelLoadError(
            f"could not load the pipeline from {path}: {exc}. Run `stepimage weights verify` to check every file."
        ) from exc
    _check_tokenizer(pipe, path)
    if text_encoder_device is None:
        pipe.to(device)
    else:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.to(text_encoder_device if name == "text_encoder" else device)
    return pipe, bool(index.get("is_distilled", False))


def _check_weight_files(path: Path) -> None:
    """Open every safetensors header, so a truncated or corrupt file is named before loading starts."""
    from safetensors import safe_open

    for weights_file in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(weights_file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError derives from Exception only
            raise ModelLoadError(
                f"corrupt or truncated weights file {weights_file}: {exc}. "
                "Run `stepimage weights verify`, then `stepimage weights pull` to fetch it again."
            ) from exc


def _check_tokenizer(pipe: Any, path: Path) -> None:
    # A tokenizer folder missing tokenizer.json still loads, as an almost empty tokenizer that turns every
    # prompt into nothing: refuse it rather than serve images that ignore their prompts.
    tokenizer = pipe.tokenizer
    if "<|im_start|>" not in tokenizer.get_vocab() or len(tokenizer) > pipe.text_encoder.config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer in {path / 'tokenizer'} is incomplete or does not match the text encoder. "
            "Run `stepimage weights verify` to list missing files."
        )


_QUOTED = re.compile(r'"([^"\n]+)"|“([^”\n]+)”|«([^»\n]+)»|「([^」\n]+)」|『([^』\n]+)』')


def quoted_spans(prompt: str) -> list[str]:
    return [next(group for group in match.groups() if group) for match in _QUOTED.finditer(prompt)]


def text_mode_prompt(prompt: str) -> str:
    """The prompt as text_mode sends it to the text encoder (see the module docstring)."""
    spans = quoted_spans(prompt)
    if spans:
        listed = ", ".join(f'"{span}"' for span in spans)
        return f"{prompt}\nRender this text exactly as written, letter for letter, sharp and legible: {listed}."
    return f"{prompt}\nAny text in the image is sharp, legible and correctly spelled."


@dataclass(frozen=True)
class EditGeometry:
    """How an input image maps onto the model's working canvas and back."""

    input_size: tuple[int, int]  # (width, height)
    canvas_size: tuple[int, int]  # input letterboxed to an aspect ratio the model accepts
    offset: tuple[int, int]  # where the input sits on the canvas
    working_size: tuple[int, int]  # what the model sees: multiples of 16

    def output_box(self) -> tuple[float, float, float, float]:
        """The input's region in working-size coordinates."""
        sx = self.working_size[0] / self.canvas_size[0]
        sy = self.working_size[1] / self.canvas_size[1]
        x0, y0 = self.offset
        w, h = self.input_size
        return (x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)


def edit_geometry(width: int, height: int, *, target_area: int = WORKING_AREA, upscale: bool = False) -> EditGeometry:
    """Working size for an edit input: about `target_area` pixels at most (or exactly, with `upscale`)."""
    canvas_w, canvas_h = width, height
    if canvas_w > MAX_ASPECT * canvas_h:
        canvas_h = math.ceil(canvas_w / MAX_ASPECT)
    elif canvas_h > MAX_ASPECT * canvas_w:
        canvas_w = math.ceil(canvas_h / MAX_ASPECT)
    offset = ((canvas_w - width) // 2, (canvas_h - height) // 2)

    scale = math.sqrt(target_area / (canvas_w * canvas_h))
    if not upscale:
        scale = min(scale, 1.0)
    work_w = max(MIN_WORKING_SIDE, int(canvas_w * scale) // MULTIPLE * MULTIPLE)
    work_h = max(MIN_WORKING_SIDE, int(canvas_h * scale) // MULTIPLE * MULTIPLE)
    # Flooring to multiples of 16 can push a canvas at exactly 8:1 just past it.
    if work_w > MAX_ASPECT * work_h:
        work_w = MAX_ASPECT * work_h
    if work_h > MAX_ASPECT * work_w:
        work_h = MAX_ASPECT * work_w
    return EditGeometry((width, height), (canvas_w, canvas_h), offset, (work_w, work_h))


def prepare_edit_input(image: Image.Image, geometry: EditGeometry, fill: int | None = None) -> Image.Image:
    """The input placed on its canvas and resized to the working size. An RGB picture's canvas repeats its edge
    pixels outward; a single-channel plane (a mask) is padded with `fill` instead."""
    if geometry.canvas_size != geometry.input_size:
        x0, y0 = geometry.offset
        pad_x = (x0, geometry.canvas_size[0] - geometry.input_size[0] - x0)
        pad_y = (y0, geometry.canvas_size[1] - geometry.input_size[1] - y0)
        if fill is None:
            array = np.pad(np.asarray(image.convert("RGB")), (pad_y, pad_x, (0, 0)), mode="edge")
        else:
            array = np.pad(np.asarray(image), (pad_y, pad_x), mode="constant", constant_values=fill)
        image = Image.fromarray(array)
    if image.size != geometry.working_size:
        image = image.resize(geometry.working_size, Image.Resampling.LANCZOS)
    return image


def restore_edit_output(image: Image.Image, geometry: EditGeometry) -> Image.Image:
    """The model's output cut back to the input's region, at exactly the input's pixel size."""
    if image.size == geometry.input_size and geometry.canvas_size == geometry.input_size:
        return image
    return image.resize(geometry.input_size, Image.Resampling.LANCZOS, box=geometry.output_box())


# Two edit inputs of different working sizes (width, height): see Flux2KleinBackend.warm_up.
WARM_UP_EDIT_SIZES = ((1024, 1024), (832, 1216))


def trim_text_encoder(text_encoder: Any, out_layers: tuple[int, ...]) -> int:
    """Drop the decoder layers after the last hidden state the pipeline reads; return how many went.

    hidden_states[k] is the output of layer k (0 is the embeddings), and only the *last* entry has
    the final norm applied, so keeping max(out_layers) + 1 layers leaves every state the pipeline reads
    bit-identical (a test checks this) while skipping the rest: 8 of Qwen3-4B's 36 layers, about a
    quarter of the text encoder's compute and weights.
    """
    keep = max(out_layers) + 1
    layers = text_encoder.model.layers
    removed = len(layers) - keep
    if removed <= 0:
        return 0
    text_encoder.model.layers = layers[:keep]
    text_encoder.config.num_hidden_layers = keep
    if getattr(text_encoder.config, "layer_types", None):
        text_encoder.config.layer_types = text_encoder.config.layer_types[:keep]
    return removed


def compile_pipeline(pipe: Any, backend: str = "inductor") -> None:
    """torch.compile the parts that dominate latency.

    Regional compilation (each repeated transformer block compiled once and reused by all 25) costs
    a fraction of whole-model compile time for the same steady-state speed; the VAE decoder is the
    second hot spot at 1 MP.
    """
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend=backend)


def build_pipeline_from_configs(
    *,
    transformer: dict,
    text_encoder: dict,
    vae: dict,
    scheduler: dict,
    is_distilled: bool,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A Flux2KleinPipeline with random weights from component configs and a locally built tokenizer.

    Used for the tiny test model and for the full-size architecture without weights (same FLOPs and
    memory as the real model, meaningless pixels) for latency benchmarks on any GPU.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipelines.tokenizer import build_local_tokenizer

    tokenizer = build_local_tokenizer()
    text_config = dict(text_encoder)
    text_config.setdefault("vocab_size", len(tokenizer))
    # Building on the target device skips a multi-gigabyte detour through host memory at full size.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_model = Qwen3ForCausalLM(Qwen3Config(**text_config))
        transformer_model = Flux2Transformer2DModel.from_config(transformer)
        vae_model = AutoencoderKLFlux2.from_config(vae)
    if dtype != torch.float32:
        text_model, transformer_model, vae_model = (m.to(dtype) for m in (text_model, transformer_model, vae_model))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
        vae=vae_model.eval(),
        text_encoder=text_model.eval(),
        tokenizer=tokenizer,
        transformer=transformer_model.eval(),
        is_distilled=is_distilled,
    )


@contextlib.contextmanager
def _references_per_row(pipe: Any, groups: list[int] | None, rows: list[int] | None, record: dict) -> Iterator[None]:
    """Condition batch row i on the reference images of request `rows[i]` alone, and record what the loop needs.

    diffusers reads `image=[a, b, ...]` as references shared by every row; a batch of independent edits needs each
    row conditioned on its own request's images. The pipeline is handed every request's working images in order
    (`groups[r]` of them for request r); each request's group is VAE-encoded once, as one multi-reference call of the
    pipeline's own `prepare_image_latents` (so position ids are exactly the pipeline's), and repeated for its rows.
    A one-request batch is the pipeline's own path (a test checks that batched rows equal solo runs).

    `record` receives the initial noise and its position ids (`noise`, `latent_ids`) and, for edits, each row's
    reference latents (`references`): the masked-edit blend and the previews read them.
    """
    original_latents = pipe.prepare_latents

    def recording_latents(*args, **kwargs):
        latents, latent_ids = original_latents(*args, **kwargs)
        record["noise"], record["latent_ids"] = latents, latent_ids
        return latents, latent_ids

    pipe.prepare_latents = recording_latents
    original_references = pipe.prepare_image_latents

    def per_row(images, batch_size, generator, device, dtype):
        encoded, start = [], 0
        for count in groups:
            group = images[start : start + count]
            start += count
            encoded.append(
                original_references(images=group, batch_size=1, generator=generator, device=device, dtype=dtype)
            )
        latents = torch.cat([encoded[index][0] for index in rows])
        ids = torch.cat([encoded[index][1] for index in rows])
        record["references"] = latents
        return latents, ids

    if groups is not None:
        pipe.prepare_image_latents = per_row
    try:
        yield
    finally:
        del pipe.prepare_latents
        if groups is not None:
            del pipe.prepare_image_latents


@dataclass
class EditPlan:
    """How one edit request's images reach the model and come back."""

    geometry: EditGeometry  # of the edited image: the output's size and placement
    working: list[Image.Image]  # the edited image, then each reference, at their working sizes
    # Mask only: (tokens, 1) weights, 1 where the input's latents are kept; and the pixel composite's alpha.
    keep: torch.Tensor | None = None
    alpha: np.ndarray | None = None

    @property
    def working_sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple(picture.size for picture in self.working)

    @property
    def image_tokens(self) -> int:
        return sum(image_tokens(height, width) for width, height in self.working_sizes)


def reference_geometry(request: GenerationRequest, index: int) -> EditGeometry:
    """Working geometry of input image `index`: the edited image follows text_mode's full-area rule, further references
    are only brought within the model's area and aspect limits."""
    picture = request.images[index]
    return edit_geometry(*picture.size, upscale=request.text_mode and index == 0)


def plan_edit(request: GenerationRequest) -> EditPlan:
    geometry = reference_geometry(request, 0)
    working = [prepare_edit_input(request.images[0], geometry)]
    for index in range(1, len(request.images)):
        working.append(prepare_edit_input(request.images[index], reference_geometry(request, index)))
    plan = EditPlan(geometry=geometry, working=working)
    if request.mask is not None:
        from pipelines import masks

        if request.mask.size != request.image.size:  # type: ignore[union-attr]
            raise ValueError(f"mask is {request.mask.size}, the image {request.image.size}")  # type: ignore[union-attr]
        working_mask = prepare_edit_input(request.mask.convert("L"), geometry, fill=0)
        plan.keep = masks.token_keep_weights(working_mask)
        plan.alpha = masks.feathered_alpha(
            request.mask, masks.feather_radius(geometry.input_size, geometry.working_size)
        )
    return plan


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """0-based steps after which a preview is taken: evenly spaced, never the last step (the final image is sent
    anyway), so fewer previews than asked when there are too few steps."""
    if partial_images <= 0 or steps <= 1:
        return []
    chosen = {round((index + 1) * steps / (partial_images + 1)) - 1 for index in range(partial_images)}
    return sorted(step for step in chosen if 0 <= step < steps - 1)


def _synchronize(device: torch.device) -> None:
    # Stage timings are only true if queued GPU work has finished when the clock is read.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Previews are decoded from the VAE latents pooled by this factor on each side (see _DenoisingLoop.decode_preview).
PREVIEW_POOL = 2


class _DenoisingLoop:
    """What one pipeline call does between its denoising steps: the masked-edit blend and the previews.

    Runs inside `callback_on_step_end`, which sees the latents just after the scheduler's step (at the next sigma)
    and, when previews are wanted, the step's velocity prediction. For this rectified-flow model
    x_next = x_t + (sigma_next - sigma_t) * v, so the predicted clean latent is x_next - sigma_next * v.
    """

    def __init__(
        self,
        backend: Flux2KleinBackend,
        requests: list[GenerationRequest],
        owner: list[int],
        plans: list[EditPlan] | None,
        size: tuple[int, int],
        progress: ProgressCallback | None,
        cancel: Any = None,
    ) -> None:
        self.backend = backend
        self.requests = requests
        self.owner = owner
        self.plans = plans
        self.height, self.width = size
        self.progress = progress
        # A request that left a batch running on for the others (`request_cancelled(index)`, when `cancel` has it).
        self.request_cancelled: Callable[[int], bool] = getattr(cancel, "request_cancelled", lambda index: False)
        self.rows = [[row for row, owned_by in enumerate(owner) if owned_by == index] for index in range(len(requests))]
        steps = requests[0].steps
        self.preview_at = [
            set(preview_steps(steps, request.partial_images)) if progress is not None else set() for request in requests
        ]
        self.previews_sent = [0] * len(requests)
        self.preview_ms = 0.0
        self.record: dict[str, torch.Tensor] = {}
        self._keep: torch.Tensor | None = None
        self.masked = plans is not None and any(plan.keep is not None for plan in plans)
        self.tensor_inputs = ["latents", "noise_pred"] if any(self.preview_at) else ["latents"]

    def _sigma_after(self, step: int) -> torch.Tensor:
        # The scheduler's sigmas carry the terminal 0, so step i ends at sigmas[i + 1].
        return self.backend.pipe.scheduler.sigmas[step + 1]

    def _keep_weights(self, like: torch.Tensor) -> torch.Tensor:
        """(rows, tokens, 1): 1 where a row keeps its input's latents, 0 where the model paints (all of an unmasked
        row)."""
        if self._keep is None:
            tokens = like.shape[1]
            per_request = [
                plan.keep if plan.keep is not None else torch.zeros(tokens, 1)
                for plan in self.plans  # type: ignore[union-attr]
            ]
            self._keep = torch.stack([per_request[index] for index in self.owner]).to(like.device, like.dtype)
        return self._keep

    def _input_latents(self, like: torch.Tensor) -> torch.Tensor:
        # The edited image is each row's first reference, at the output's working size: its tokens come first.
        return self.record["references"][:, : like.shape[1]].to(like.dtype)

    def after_step(self, step: int, tensors: dict) -> dict:
        latents = tensors["latents"]
        sigma = self._sigma_after(step).to(latents.dtype)
        if self.masked:
            keep = self._keep_weights(latents)
            source = self._input_latents(latents)
            noised = (1 - sigma) * source + sigma * self.record["noise"].to(latents.dtype)
            latents = keep * noised + (1 - keep) * latents
        # Decoding and compositing a preview nobody will receive is wasted device time for the requests still here.
        wanted = [
            index for index, steps in enumerate(self.preview_at) if step in steps and not self.request_cancelled(index)
        ]
        if wanted:
            started = time.perf_counter()
            estimate = tensors["latents"] - sigma * tensors["noise_pred"]
            if self.masked:
                estimate = keep * source + (1 - keep) * estimate
            for index in wanted:
                rows = self.rows[index]
                pictures = self.finish_rows(rows, self.decode_preview(self.to_vae_latents(estimate[rows])))
                partial = PartialImages(
                    index=self.previews_sent[index],
                    images=pictures,
                    step=step + 1,
                    steps=self.requests[index].steps,
                )
                self.previews_sent[index] += 1
                self.progress(index, partial)  # type: ignore[misc]
            _synchronize(self.backend.device)
            self.preview_ms += (time.perf_counter() - started) * 1000
        return {"latents": latents}

    def decode_preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Previews at the working size, decoded from latents pooled 2x2: a quarter of a full decode's work (the
        full-size VAE decoder costs 10.5 TFLOP for one 1024x1024 image, counted on the meta device; 2.6 pooled), and
        on the tiny model on 2 CPU cores 49 ms instead of 250 ms. A preview only has to show where the picture is
        going; the final image is decoded at full resolution."""
        if min(latents.shape[-2:]) >= 2 * PREVIEW_POOL:
            latents = torch.nn.functional.avg_pool2d(latents, PREVIEW_POOL)
        pictures = self.backend.decode_batch(latents)
        return [picture.resize((self.width, self.height), Image.Resampling.BILINEAR) for picture in pictures]

    def to_vae_latents(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed (rows, tokens, channels) latents as the VAE takes them, the way the pipeline's own output path
        unpacks, de-normalizes and unpatchifies its final latents."""
        pipe = self.backend.pipe
        ids = self.record["latent_ids"][: packed.shape[0]]
        grid = pipe._unpack_latents_with_ids(packed, ids, self.height // 16, self.width // 16)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        return pipe._unpatchify_latents(grid * std.to(grid.device, grid.dtype) + mean)

    def finish_rows(self, rows: list[int], pictures: list[Image.Image]) -> list[Image.Image]:
        """Decoded working-size pictures of `rows`, brought back to each edit's input size (and, for a masked edit,
        laid over the input so that everything outside the mask's feather is the input's own pixels)."""
        if self.plans is None:
            return pictures
        from pipelines import masks

        finished = []
        for row, picture in zip(rows, pictures):
            index = self.owner[row]
            plan = self.plans[index]
            picture = restore_edit_output(picture, plan.geometry)
            if plan.alpha is not None:
                picture = masks.composite(picture, self.requests[index].image, plan.alpha)  # type: ignore[arg-type]
            finished.append(picture)
        return finished

    def finish(self, pictures: list[Image.Image]) -> list[Image.Image]:
        return self.finish_rows(list(range(len(pictures))), pictures)


class Flux2KleinBackend:
    """A loaded FLUX.2 [klein] pipeline. Not thread-safe: the engine calls it from one thread."""

    def __init__(self, pipe: Any, spec: ModelSpec, options: RunOptions, info: BackendInfo) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from pipelines.offload import TextEncoderPlacement
        from pipelines.quantize import check_quantization, quantize_transformer

        check_quantization(options.quantize, options.device, options.dtype)

        self.pipe = pipe
        self.spec = spec
        self.options = options
        self.info = info
        self.device = torch.device(options.device)
        pipe.set_progress_bar_config(disable=True)
        # Previews read the step's velocity prediction: a local of the denoising loop that the pipeline hands to
        # `callback_on_step_end` once it is listed among the callback's tensor inputs.
        if "noise_pred" not in pipe._callback_tensor_inputs:
            pipe._callback_tensor_inputs = [*pipe._callback_tensor_inputs, "noise_pred"]
        # Our sigmas arrive already shifted (pipelines.scheduling); the scheduler must pass them through.
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config,
            use_dynamic_shifting=False,
            shift=1.0,
            shift_terminal=None,
            use_karras_sigmas=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
        )
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if options.trim_text_encoder:
            removed = trim_text_encoder(pipe.text_encoder, spec.text_encoder_out_layers)
            logger.info("text encoder: dropped %d layer(s) the pipeline never reads", removed)
        self.text_encoder_home = TextEncoderPlacement(pipe.text_encoder, options.text_encoder_placement, options.device)
        self.text_encoder_home.release_before(pipe.transformer)
        if options.attention_backend:
            pipe.transformer.set_attention_backend(options.attention_backend)
        # Quantize before compiling: the compiled graphs are traced over the float8 weights.
        self.quantization = quantize_transformer(pipe.transformer, options.quantize)
        if options.compile:
            compile_pipeline(pipe, backend=options.compile_backend)

    # -- prompts ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt embedding, from an LRU cache when the same prompt was seen recently."""
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            self._prompt_cache.move_to_end(prompt)
            return cached
        with self.text_encoder_home.encoding():
            embeds, _ = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                max_sequence_length=self.spec.max_sequence_length,
                text_encoder_out_layers=self.spec.text_encoder_out_layers,
            )
        if self.options.prompt_cache_size > 0:
            self._prompt_cache[prompt] = embeds
            while len(self._prompt_cache) > self.options.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        return embeds

    # -- generation ------------------------------------------------------------------------------

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys can share one pipeline call: same task, working sizes (of the output and of
        every reference image), steps, guidance and text_mode. Prompts, negative prompts, seeds, input images, masks
        and previews may all differ."""
        if request.image is not None:
            sizes = tuple(reference_geometry(request, index).working_size for index in range(len(request.images)))
        else:
            sizes = ((request.width, request.height),)
        return (
            "edit" if request.image is not None else "text-to-image",
            sizes,
            request.steps,
            request.cfg_scale,
            request.text_mode,
        )

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` the text encoder reads: the chat-templated prompt, up to the sequence limit. Padding to
        that limit is not counted."""
        tokenizer = self.pipe.tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        ids = tokenizer(text, truncation=True, max_length=self.spec.max_sequence_length)["input_ids"]
        return len(ids)

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> GenerationResult:
        return self.generate_batch([request], cancel)[0]

    def generate_batch(
        self, requests: list[GenerationRequest], cancel: Any = None, progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Run requests with one `batch_key` as a single pipeline call: one row per image (n images per
        request, seeds seed..seed+n-1), each row with its own prompt, negative prompt, noise, input images and mask.

        `cancel` is anything with `is_set()`; when it turns true the call stops at the next step. `progress`
        receives each request's previews (`GenerationRequest.partial_images`), except those of a request for which
        `cancel.request_cancelled(index)` (where `cancel` has it) is true: gone, while the others run on.
        """
        keys = {self.batch_key(request) for request in requests}
        if len(keys) != 1:
            raise ValueError(f"requests in one batch must share a batch key, got {len(keys)} different ones")
        first = requests[0]
        timings = {"encode_prompt": 0.0, "denoise": 0.0, "decode": 0.0}

        started = time.perf_counter()
        prompts = [text_mode_prompt(r.prompt) if r.text_mode else r.prompt for r in requests]
        use_cfg = first.cfg_scale > 1.0
        # One row per image; `owner[i]` is the request that row belongs to.
        owner = [index for index, request in enumerate(requests) for _ in request.seeds]
        embeds = [self.encode_prompt(prompt) for prompt in prompts]
        prompt_embeds = torch.cat([embeds[index] for index in owner])
        negative_embeds = None
        if use_cfg:
            negatives = [self.encode_prompt(request.negative_prompt) for request in requests]
            negative_embeds = torch.cat([negatives[index] for index in owner])
        _synchronize(self.device)
        timings["encode_prompt"] = (time.perf_counter() - started) * 1000

        plans: list[EditPlan] | None = None
        working_images = None
        if first.image is not None:
            plans = [plan_edit(request) for request in requests]
            working_images = [picture for plan in plans for picture in plan.working]
            width, height = plans[0].geometry.working_size
        else:
            width, height = first.width, first.height
        sigmas = flux2_sigmas(first.steps, image_tokens(height, width))
        loop = _DenoisingLoop(self, requests, owner, plans, (height, width), progress, cancel)

        step_ends: list[float] = []

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            outputs = loop.after_step(step, callback_kwargs)
            if self.options.step_timing:
                _synchronize(self.device)
                step_ends.append(time.perf_counter())
            return outputs

        if cancel is not None and cancel.is_set():
            raise Cancelled()
        started = denoise_started = time.perf_counter()
        # A CPU generator per image gives the same noise whatever the device and whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for request in requests for seed in request.seeds]
        groups = [len(plan.working) for plan in plans] if plans is not None else None
        with _references_per_row(self.pipe, groups, owner, loop.record):
            latents = self.pipe(
                image=working_images,
                prompt=None,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                height=height,
                width=width,
                num_inference_steps=first.steps,
                sigmas=sigmas,
                guidance_scale=first.cfg_scale,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=loop.tensor_inputs,
                max_sequence_length=self.spec.max_sequence_length,
                text_encoder_out_layers=self.spec.text_encoder_out_layers,
            ).images
        _synchronize(self.device)
        timings["denoise"] = (time.perf_counter() - started) * 1000 - loop.preview_ms
        if loop.preview_ms:
            timings["previews"] = loop.preview_ms

        started = time.perf_counter()
        pictures = loop.finish(self.decode_batch(latents))
        timings["decode"] = (time.perf_counter() - started) * 1000

        output_tokens = image_tokens(height, width)
        results = []
        for index, request in enumerate(requests):
            text_tokens = self.prompt_tokens(prompts[index])
            if use_cfg:
                text_tokens += self.prompt_tokens(request.negative_prompt)
            details = {
                "prompt_sent": prompts[index],
                "negative_prompt_encoded": use_cfg,
                "transformer_passes_per_step": 2 if use_cfg else 1,
                "working_size": (width, height),
                "sigmas": sigmas,
                "batch_images": len(owner),
                "reference_images": len(request.images),
                "masked": request.mask is not None,
                "previews": loop.previews_sent[index],
                "usage": {
                    "text_tokens": text_tokens,
                    "image_tokens": plans[index].image_tokens if plans is not None else 0,
                    "output_tokens": output_tokens * request.n,
                },
            }
            if step_ends:
                # Step 0 also carries the pipeline's set-up (reference-image encoding for edits).
                marks = [denoise_started, *step_ends]
                details["step_ms"] = [(end - begin) * 1000 for begin, end in zip(marks, marks[1:])]
            images = [pictures[row] for row, owned_by in enumerate(owner) if owned_by == index]
            results.append(
                GenerationResult(images=images, seeds=request.seeds, timings_ms=dict(timings), details=details)
            )
        return results

    @torch.no_grad()
    def decode_batch(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def warm_up(
        self,
        sizes: list[tuple[int, int]],
        progress: Callable[[str], None] | None = None,
        edit_sizes: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """Run every (height, width) once, a batch of two, a preview, then two edits, so that no request pays
        first-call costs.

        With compile on, the first two distinct shapes make torch.compile mark the sequence length
        dynamic, so edits of any input size reuse the compiled graphs instead of recompiling; the batch
        of two does the same for the batch dimension (without it the first batched request recompiled
        three graphs, counted with the CPU aot_eager backend in tests/pipelines/test_quantize_offload.py).
        `edit_sizes` (width, height) replaces WARM_UP_EDIT_SIZES where 1 MP edits cost too much (tiny dry runs).
        """
        for height, width in sizes:
            if progress is not None:
                progress(f"warming up text-to-image {height}x{width}")
            self.generate(GenerationRequest(prompt="warm-up", seed=0, steps=1, height=height, width=width))
        if sizes:
            height, width = sizes[0]
            if progress is not None:
                progress(f"warming up a batch of two {height}x{width}")
            self.generate(GenerationRequest(prompt="warm-up", seed=0, steps=1, height=height, width=width, n=2))
            if progress is not None:
                progress(f"warming up a preview {height}x{width}")
            # Previews decode pooled latents, a shape nothing else decodes: without this the first streamed request
            # recompiled the VAE decoder (counted with the CPU aot_eager backend in
            # tests/pipelines/test_klein_masks_references_previews.py).
            preview = GenerationRequest(prompt="warm-up", seed=0, steps=2, height=height, width=width, partial_images=1)
            self.generate_batch([preview], None, progress=lambda index, partial: None)
        for width, height in WARM_UP_EDIT_SIZES if edit_sizes is None else edit_sizes:
            if progress is not None:
                progress(f"warming up edit {width}x{height}")
            source = Image.new("RGB", (width, height), (127, 127, 127))
            self.generate(GenerationRequest(prompt="warm-up", seed=0, steps=1, image=source))


def load_checkpoint_backend(path: Path, name: str, options: RunOptions) -> Flux2KleinBackend:
    """The backend for a real checkpoint directory (diffusers layout)."""
    from pipelines.quantize import check_quantization

    # Refuse an impossible --quantize before minutes of loading, not after.
    check_quantization(options.quantize, options.device, options.dtype)
    text_encoder_device = None if options.text_encoder_placement == "device" else "cpu"
    pipe, is_distilled = load_pipeline(
        path, dtype=resolve_dtype(options.dtype), device=options.device, text_encoder_device=text_encoder_device
    )
    info = BackendInfo(
        backend="flux2-klein",
        model=name,
        device=options.device,
        dtype=options.dtype,
        notes=("step-distilled checkpoint: cfg_scale > 1 doubles the cost per step",) if is_distilled else (),
    )
    return Flux2KleinBackend(pipe, checkpoint_spec(pipe, name), options, info)


def checkpoint_spec(pipe: Any, name: str) -> ModelSpec:
    """Which text-encoder layers to read: the published (9, 18, 27) when they fit the checkpoint, else the
    last layers that fill the transformer's text width (the tiny model: 3 layers of 16 -> (1, 2, 3))."""
    spec = ModelSpec(name=name)
    depth = pipe.text_encoder.config.num_hidden_layers
    width = pipe.text_encoder.config.hidden_size
    joint = pipe.transformer.config.joint_attention_dim
    if max(spec.text_encoder_out_layers) <= depth and len(spec.text_encoder_out_layers) * width == joint:
        return spec
    count, rest = divmod(joint, width)
    if rest or not 0 < count <= depth:
        raise ModelLoadError(
            f"text encoder ({depth} layers of width {width}) does not fit the transformer "
            f"(joint_attention_dim {joint}): mismatched components"
        )
    return ModelSpec(name=name, text_encoder_out_layers=tuple(range(depth - count + 1, depth + 1)))


def load_random_weights_backend(checkpoint: Any, options: RunOptions) -> Flux2KleinBackend:
    """The FULL-SIZE architecture of `checkpoint` with random weights, for latency work without a download.

    The weights are drawn on the serving device whatever the text encoder's placement, so every
    placement serves the same random model (the backend moves the text encoder afterwards).
    """
    from pipelines.quantize import check_quantization

    check_quantization(options.quantize, options.device, options.dtype)
    pipeline_config = checkpoint.config("pipeline")
    pipe = build_pipeline_from_configs(
        transformer=checkpoint.config("transformer"),
        text_encoder=checkpoint.config("text_encoder"),
        vae=checkpoint.config("vae"),
        scheduler=checkpoint.config("scheduler"),
        # Guidance is decided per request (module docstring), exactly as for loaded weights.
        is_distilled=False,
        device=options.device,
        dtype=resolve_dtype(options.dtype),
    )
    spec = ModelSpec(
        name=checkpoint.name,
        text_encoder_out_layers=tuple(pipeline_config["text_encoder_out_layers"]),
        max_sequence_length=pipeline_config["max_sequence_length"],
    )
    note = "RANDOM WEIGHTS: full-size architecture for latency benchmarks; images are meaningless"
    logger.warning("%s (%s)", note, checkpoint.name)
    info = BackendInfo(
        backend="flux2-klein",
        model=checkpoint.name,
        device=options.device,
        dtype=options.dtype,
        random_weights=True,
        notes=(note,),
    )
    return Flux2KleinBackend(pipe, spec, options, info)
