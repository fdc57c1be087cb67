"""Masked edits: which latent tokens the model may change, and the pixel composite that keeps the rest exact.

A mask (mode "L", the edited image's size) is 255 where the picture is to be regenerated and 0 where it must stay
as it was. Two mechanisms use it:

1. **In the denoising loop** (`token_keep_weights`): after every step, the latent tokens outside the mask are reset
   to the input's own latents noised to the current noise level, so the model paints the masked area in context with
   what surrounds it (the blend that inpainting samplers use). A token is free to change when any pixel of its 16x16
   patch is masked, and one more token around that region is freed, so the seam lies in latents the model generated.
2. **In pixel space** (`feathered_alpha`, `composite`): the VAE's reconstruction of the unchanged latents is close to
   the input but not equal, so the decoded result is laid over the original input through the mask widened by a
   narrow feather: inside the mask the generated pixels, a short ramp outside it, and beyond the ramp the input's
   pixels exactly (alpha is exactly 0 there, and the integer composite returns the input byte for byte).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Pixels of the model's 16-pixel latent patch (VAE factor 8 x 2x2 packing).
PATCH = 16
# Half-width of the feather ramp, in pixels of the working canvas (~1 MP): the ramp spans twice this outside the mask.
FEATHER_WORKING_PX = 4


def _max_filter(plane: torch.Tensor, radius: int) -> torch.Tensor:
    """Grey dilation with a (2r+1)-square window, as two 1-D passes (linear in the radius)."""
    if radius <= 0:
        return plane
    size = 2 * radius + 1
    plane = F.max_pool2d(plane, (1, size), stride=1, padding=(0, radius))
    return F.max_pool2d(plane, (size, 1), stride=1, padding=(radius, 0))


def _box_filter(plane: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)-square window (edges averaged over the pixels that exist), as two 1-D passes."""
    if radius <= 0:
        return plane
    size = 2 * radius + 1
    plane = F.avg_pool2d(plane, (1, size), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(plane, (size, 1), stride=1, padding=(radius, 0), count_include_pad=False)


def token_keep_weights(working_mask: Image.Image, extra_tokens: int = 1) -> torch.Tensor:
    """(tokens, 1) weights in token order (row-major over the working size / 16): 1.0 where the input's latents are
    kept, 0.0 where the model regenerates. `working_mask` is the mask resized to the working size."""
    width, height = working_mask.size
    if width % PATCH or height % PATCH:
        raise ValueError(f"working size {width}x{height} is not a multiple of {PATCH}")
    plane = torch.from_numpy(np.asarray(working_mask, dtype=np.float32) / 255.0)[None, None]
    # Any masked pixel frees its whole patch.
    changed = F.max_pool2d(plane, PATCH, stride=PATCH) > 0
    changed = _max_filter(changed.float(), extra_tokens) > 0
    return (~changed).float().reshape(-1, 1)


def feather_radius(input_size: tuple[int, int], working_size: tuple[int, int]) -> int:
    """The feather's half-width in input pixels: FEATHER_WORKING_PX on the working canvas, scaled to the input."""
    scale = max(input_size[0] / working_size[0], input_size[1] / working_size[1])
    return max(1, round(FEATHER_WORKING_PX * scale))


def feathered_alpha(mask: Image.Image, radius: int) -> np.ndarray:
    """uint8 alpha at the mask's size: 255 on every masked pixel, a ramp over 2*radius pixels outside it, 0 beyond.

    Dilating by `radius` and then averaging over the same radius keeps every masked pixel at exactly 255 (its whole
    window lies in the dilated area) and leaves pixels farther than 2*radius from the mask at exactly 0.
    """
    plane = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    plane = (plane > 0).float()
    alpha = _box_filter(_max_filter(plane, radius), radius)
    alpha = torch.where(plane > 0, torch.ones_like(alpha), alpha)
    return (alpha[0, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def composite(generated: Image.Image, original: Image.Image, alpha: np.ndarray) -> Image.Image:
    """generated * alpha + original * (255 - alpha), rounded, in integers: where alpha is 0 the original's bytes
    come back unchanged."""
    fresh = np.asarray(generated.convert("RGB"), dtype=np.uint32)
    kept = np.asarray(original.convert("RGB"), dtype=np.uint32)
    weight = alpha.astype(np.uint32)[..., None]
    mixed = (fresh * weight + kept * (255 - weight) + 127) // 255
    return Image.fromarray(mixed.astype(np.uint8), "RGB")
