"""The denoising schedules (sigmas) for FLUX.2 [klein], in one place.

FLUX.2 is a rectified-flow model: sigma goes from 1 (pure noise) to 0 (image). Black Forest Labs
trained it with a *resolution- and step-count-dependent* time shift: the schedule starts from evenly
spaced sigmas `1, 1 - 1/N, ..., 1/N` and pushes them towards the noisy end by
`exp(mu) / (exp(mu) + 1/sigma - 1)`, where `mu` grows with the number of image tokens (bigger images
keep their composition steps longer) and, for short schedules, with the number of steps. The
coefficients below are the empirical fit published with the model (the same numbers diffusers uses
in `compute_empirical_mu`); a test checks that our schedule matches what diffusers' own scheduler
derives, so serving with an explicit schedule changes nothing about image quality while making the
schedule visible, testable and the same for every entry point.

Why these values at 8 steps: the distilled klein checkpoint was trained for 4 steps; 8 steps of
the same shifted family spend most steps at high noise, where a distilled model decides layout and
text, and finish with one long step that its velocity prediction handles. At 1024x1024 (4096 tokens):

    steps=4 -> 1.000, 0.967, 0.908, 0.767, then 0
    steps=8 -> 1.000, 0.985, 0.967, 0.942, 0.906, 0.853, 0.763, 0.580, then 0

Any step count in 1..50 uses the same formula.
"""

from __future__ import annotations

import math

# Linear fits of mu against image tokens, at 10 steps (a1, b1) and at 200 steps (a2, b2), published
# with FLUX.2; between those, mu is interpolated linearly in the step count.
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666
# Above this many image tokens the step-count dependence is dropped (the 200-step fit is used).
_LARGE_IMAGE_TOKENS = 4300

MIN_STEPS = 1
MAX_STEPS = 50


def empirical_mu(image_tokens: int, steps: int) -> float:
    """The time-shift parameter for an image of `image_tokens` latent tokens denoised in `steps` steps."""
    if image_tokens > _LARGE_IMAGE_TOKENS:
        return _A2 * image_tokens + _B2
    mu_200 = _A2 * image_tokens + _B2
    mu_10 = _A1 * image_tokens + _B1
    slope = (mu_200 - mu_10) / 190.0
    return slope * steps + (mu_200 - 200.0 * slope)


def image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Latent tokens of one image: the VAE divides each side by 8 and the model packs 2x2 latent patches."""
    patch = vae_scale_factor * 2
    return (height // patch) * (width // patch)


def flux2_sigmas(steps: int, image_tokens: int) -> list[float]:
    """The `steps` sigmas (terminal 0 excluded) for an image of `image_tokens` tokens."""
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")
    mu = empirical_mu(image_tokens, steps)
    shift = math.exp(mu)
    sigmas = []
    for i in range(steps):
        # Evenly spaced from 1 down to 1/steps, exactly like the base schedule the fit was made on.
        base = 1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) if steps > 1 else 1.0
        sigmas.append(shift / (shift + (1.0 / base - 1.0)))
    return sigmas
