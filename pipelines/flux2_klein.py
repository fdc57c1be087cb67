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

from pipelines.base import BackendInfo, Cancelled, GenerationRequest, GenerationResult, ModelLoadError
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


def prepare_edit_input(image: Image.Image, geometry: EditGeometry) -> Image.Image:
    """The input placed on its canvas (edge pixels repeated outward) and resized to the working size."""
    if geometry.canvas_size != geometry.input_size:
        array = np.asarray(image.convert("RGB"))
        x0, y0 = geometry.offset
        pad_x = (x0, geometry.canvas_size[0] - geometry.input_size[0] - x0)
        pad_y = (y0, geometry.canvas_size[1] - geometry.input_size[1] - y0)
        image = Image.fromarray(np.pad(array, (pad_y, pad_x, (0, 0)), mode="edge"))
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
def _one_reference_per_row(pipe: Any, rows: list[int] | None) -> Iterator[None]:
    """Make the pipeline condition batch row i on input image `rows[i]` alone.

    diffusers reads `image=[a, b]` as several references for every row (multi-reference editing) and
    repeats them across the batch; a batch of independent edits needs each row conditioned on its own
    request's image. Only how reference latents are stacked changes: each image is VAE-encoded once
    and given the position ids of a single reference exactly as the pipeline does, so a one-row batch
    is the pipeline's own path (a test checks that batched rows equal solo runs).
    """
    if rows is None:
        yield
        return
    original = pipe.prepare_image_latents

    def per_row(images, batch_size, generator, device, dtype):
        encoded = [
            original(images=[image], batch_size=1, generator=generator, device=device, dtype=dtype) for image in images
        ]
        latents = torch.cat([encoded[index][0] for index in rows])
        ids = torch.cat([encoded[index][1] for index in rows])
        return latents, ids

    pipe.prepare_image_latents = per_row
    try:
        yield
    finally:
        del pipe.prepare_image_latents


def _synchronize(device: torch.device) -> None:
    # Stage timings are only true if queued GPU work has finished when the clock is read.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        """Requests with equal keys can share one pipeline call: same task, working size, steps, guidance
        and text_mode. Prompts, negative prompts, seeds and input images may all differ."""
        if request.image is not None:
            size = edit_geometry(*request.image.size, upscale=request.text_mode).working_size
        else:
            size = (request.width, request.height)
        return (
            "edit" if request.image is not None else "text-to-image",
            size,
            request.steps,
            request.cfg_scale,
            request.text_mode,
        )

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> GenerationResult:
        return self.generate_batch([request], cancel)[0]

    def generate_batch(self, requests: list[GenerationRequest], cancel: Any = None) -> list[GenerationResult]:
        """Run requests with one `batch_key` as a single pipeline call: one row per image (n images per
        request, seeds seed..seed+n-1), each row with its own prompt, negative prompt, noise and input image.

        `cancel` is anything with `is_set()`; when it turns true the call stops at the next step.
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

        geometries: list[EditGeometry | None] = [None] * len(requests)
        working_images = None
        if first.image is not None:
            geometries = [edit_geometry(*r.image.size, upscale=r.text_mode) for r in requests]  # type: ignore[union-attr]
            # One working image per request; rows of the same request share it (_one_reference_per_row).
            working_images = [prepare_edit_input(r.image, g) for r, g in zip(requests, geometries)]  # type: ignore[arg-type]
            width, height = geometries[0].working_size  # type: ignore[union-attr]
        else:
            width, height = first.width, first.height
        sigmas = flux2_sigmas(first.steps, image_tokens(height, width))

        step_ends: list[float] = []

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if self.options.step_timing:
                _synchronize(self.device)
                step_ends.append(time.perf_counter())
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            return callback_kwargs

        if cancel is not None and cancel.is_set():
            raise Cancelled()
        started = denoise_started = time.perf_counter()
        # A CPU generator per image gives the same noise whatever the device and whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for request in requests for seed in request.seeds]
        with _one_reference_per_row(self.pipe, owner if working_images is not None else None):
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
                max_sequence_length=self.spec.max_sequence_length,
                text_encoder_out_layers=self.spec.text_encoder_out_layers,
            ).images
        _synchronize(self.device)
        timings["denoise"] = (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        pictures = self.decode_batch(latents)
        for row, index in enumerate(owner):
            geometry = geometries[index]
            if geometry is not None:
                pictures[row] = restore_edit_output(pictures[row], geometry)
        timings["decode"] = (time.perf_counter() - started) * 1000

        results = []
        for index, request in enumerate(requests):
            details = {
                "prompt_sent": prompts[index],
                "negative_prompt_encoded": use_cfg,
                "transformer_passes_per_step": 2 if use_cfg else 1,
                "working_size": (width, height),
                "sigmas": sigmas,
                "batch_images": len(owner),
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
        """Run every (height, width) once, a batch of two, then two edits, so that no request pays
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
