"""Choosing and loading the backend named by the settings (tiny, flux2-klein, or auto)."""

from __future__ import annotations

import logging

from pipelines.base import Backend, ModelLoadError
from server.config import Settings

logger = logging.getLogger(__name__)


def resolve_device(settings: Settings) -> str:
    return resolve_devices(settings)[0]


def resolve_devices(settings: Settings) -> list[str]:
    """--devices, else --device, else every visible GPU, else the CPU."""
    import torch

    if settings.devices:
        return list(settings.devices)
    if settings.device:
        return [settings.device]
    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["cpu"]


def resolve_dtype_name(settings: Settings, device: str) -> str:
    """bf16 on GPUs that have it (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    import torch

    if settings.dtype != "auto":
        return settings.dtype
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def run_options(settings: Settings, device: str, dtype: str):
    from pipelines.flux2_klein import RunOptions

    compile_on = settings.compile if settings.compile is not None else device.startswith("cuda")
    return RunOptions(
        device=device,
        dtype=dtype,
        prompt_cache_size=settings.prompt_cache_size,
        compile=compile_on,
        attention_backend=settings.attention_backend,
        trim_text_encoder=settings.trim_text_encoder,
        quantize=settings.quantize,
        text_encoder_placement=settings.text_encoder_placement,
    )


def _load_flux2_klein(settings: Settings, device: str, dtype: str) -> Backend:
    from pipelines.flux2_klein import load_checkpoint_backend, load_random_weights_backend
    from weights.manifest import UnknownCheckpoint, get_checkpoint
    from weights.store import WeightsNotFound, find_checkpoint

    try:
        checkpoint = get_checkpoint(settings.checkpoint)
    except UnknownCheckpoint as exc:
        raise ModelLoadError(str(exc)) from exc
    options = run_options(settings, device, dtype)
    if settings.random_weights:
        return load_random_weights_backend(checkpoint, options)
    try:
        path = find_checkpoint(checkpoint, settings.weights_dir)
    except WeightsNotFound as exc:
        raise ModelLoadError(str(exc)) from exc
    return load_checkpoint_backend(path, checkpoint.name, options)


def load_backend(settings: Settings, device: str | None = None) -> Backend:
    """The configured backend on `device` (default: the first configured device)."""
    from dataclasses import replace

    from pipelines.tiny import load_tiny_backend

    device = device or resolve_device(settings)
    dtype = resolve_dtype_name(settings, device)
    backend = settings.backend
    if backend == "auto":
        if settings.random_weights:
            backend = "flux2-klein"
        elif not device.startswith("cuda"):
            logger.warning(
                "backend auto: no CUDA device, so the TINY RANDOM-WEIGHT model is serving; its images are noise. "
                "Run on a GPU with weights (`stepimage weights pull`) for real images."
            )
            backend = "tiny"
        else:
            try:
                return _load_flux2_klein(settings, device, dtype)
            except ModelLoadError as exc:
                logger.warning(
                    "backend auto: FLUX.2 [klein] weights are not usable (%s); the TINY RANDOM-WEIGHT model is "
                    "serving instead and its images are noise.",
                    exc,
                )
                backend = "tiny"
    if backend == "tiny":
        # The tiny model is float32 on CPU; half precision on CPU would only slow it down.
        options = run_options(settings, device, dtype)
        if not device.startswith("cuda") and settings.dtype == "auto":
            options = replace(options, dtype="fp32")
        return load_tiny_backend(options)
    return _load_flux2_klein(settings, device, dtype)
