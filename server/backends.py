"""Choosing and loading the backend named by the settings (tiny, flux2-klein, or auto)."""

from __future__ import annotations

import logging

from pipelines.base import Backend, ModelLoadError
from server.config import Settings

logger = logging.getLogger(__name__)


def resolve_device(settings: Settings) -> str:
    import torch

    if settings.device:
        return settings.device
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_dtype_name(settings: Settings, device: str) -> str:
    """bf16 on GPUs that have it (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    import torch

    if settings.dtype != "auto":
        return settings.dtype
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _load_flux2_klein(settings: Settings, device: str, dtype: str) -> Backend:
    from pipelines.flux2_klein import RunOptions, load_checkpoint_backend
    from weights.manifest import get_checkpoint
    from weights.store import WeightsNotFound, find_checkpoint

    checkpoint = get_checkpoint(settings.checkpoint)
    try:
        path = find_checkpoint(checkpoint, settings.weights_dir)
    except WeightsNotFound as exc:
        raise ModelLoadError(str(exc)) from exc
    return load_checkpoint_backend(path, checkpoint.name, RunOptions(device=device, dtype=dtype))


def load_backend(settings: Settings) -> Backend:
    from pipelines.flux2_klein import RunOptions
    from pipelines.tiny import load_tiny_backend

    device = resolve_device(settings)
    dtype = resolve_dtype_name(settings, device)
    backend = settings.backend
    if backend == "auto":
        if not device.startswith("cuda"):
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
        return load_tiny_backend(RunOptions(device=device, dtype=dtype if device.startswith("cuda") else "fp32"))
    return _load_flux2_klein(settings, device, dtype)
