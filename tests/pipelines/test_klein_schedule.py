"""The explicit sigma schedule equals diffusers' own resolution-shifted schedule, and reaches the scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image

from pipelines.scheduling import MAX_STEPS, empirical_mu, flux2_sigmas, image_tokens
from pipelines.tiny import SCHEDULER_CONFIG

pytestmark = pytest.mark.pipelines

STEPS = (1, 2, 4, 8, 20, 50)
TOKENS = (256, 3600, 4096, 5440)


def diffusers_sigmas(steps: int, tokens: int) -> np.ndarray:
    """What Flux2KleinPipeline.__call__ derives when it is given no sigmas (its default path)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    return scheduler.sigmas[:-1].numpy()


def used_sigmas(backend) -> np.ndarray:
    """The sigmas the backend's scheduler actually stepped through on the last call (terminal 0 dropped)."""
    return backend.pipe.scheduler.sigmas[:-1].numpy()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_matches_diffusers(steps, tokens):
    ours = np.array(flux2_sigmas(steps, tokens))
    assert ours.shape == (steps,)
    np.testing.assert_allclose(ours, diffusers_sigmas(steps, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", (16, 256, 4096, 4300, 4301, 8704))
@pytest.mark.parametrize("steps", (1, 4, 50))
def test_empirical_mu_matches_diffusers(steps, tokens):
    assert empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-9)


def test_schedule_is_decreasing_from_one():
    for steps in STEPS:
        sigmas = flux2_sigmas(steps, 4096)
        assert sigmas[0] == pytest.approx(1.0)
        assert all(later < earlier for earlier, later in zip(sigmas, sigmas[1:]))
        # One step is a single jump from pure noise (sigma 1) to the image; longer schedules end above 0.
        assert 0 < sigmas[-1] < 1 or steps == 1


@pytest.mark.parametrize("steps", (0, -1, MAX_STEPS + 1))
def test_steps_outside_range_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        flux2_sigmas(steps, 4096)


def test_backend_rejects_steps_outside_range_before_denoising(klein_backend, spy, small):
    with pytest.raises(ValueError, match="steps"):
        klein_backend.generate(small("fifty-one steps", steps=MAX_STEPS + 1))
    assert spy.passes == 0


def test_image_tokens_is_what_the_transformer_sees(klein_backend, spy, small):
    assert image_tokens(1024, 1024) == 4096
    klein_backend.generate(small("a tall image", height=128, width=64))
    assert spy.pass_tokens == [image_tokens(128, 64)] * 2


@pytest.mark.parametrize(("height", "width", "steps"), [(64, 64, 2), (128, 64, 4), (64, 64, 1)])
def test_backend_passes_our_sigmas_to_the_scheduler(klein_backend, small, height, width, steps):
    result = klein_backend.generate(small("schedule check", height=height, width=width, steps=steps))
    expected = flux2_sigmas(steps, image_tokens(height, width))
    np.testing.assert_allclose(used_sigmas(klein_backend), expected, rtol=0, atol=1e-6)
    # Timesteps follow from the sigmas; nothing re-shifted them inside the scheduler.
    np.testing.assert_allclose(klein_backend.pipe.scheduler.timesteps.numpy(), np.array(expected) * 1000, rtol=1e-6)
    assert result.details["sigmas"] == expected


def test_edit_schedule_uses_the_working_size(klein_backend, small):
    picture = Image.new("RGB", (100, 80), (30, 120, 200))
    result = klein_backend.generate(small("edit schedule", image=picture, steps=3))
    width, height = result.details["working_size"]
    expected = flux2_sigmas(3, image_tokens(height, width))
    np.testing.assert_allclose(used_sigmas(klein_backend), expected, rtol=0, atol=1e-6)


def test_explicit_schedule_paints_what_diffusers_default_path_paints(klein_backend, small):
    """Serving with explicit sigmas changes nothing: same latents as the pipeline's own shifted schedule."""
    request = small("the schedule is the same", steps=4, height=64, width=128)
    ours = klein_backend.generate(request).images[0]

    pipe = klein_backend.pipe
    serving_scheduler = pipe.scheduler
    # The pipeline as diffusers ships it: a dynamically shifting scheduler and no sigmas argument.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    try:
        latents = pipe(
            prompt_embeds=klein_backend.encode_prompt(request.prompt),
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="latent",
            text_encoder_out_layers=klein_backend.spec.text_encoder_out_layers,
        ).images
        np.testing.assert_allclose(
            pipe.scheduler.sigmas[:-1].numpy(), flux2_sigmas(4, image_tokens(64, 128)), rtol=0, atol=1e-5
        )
    finally:
        pipe.scheduler = serving_scheduler
    reference = klein_backend.decode_batch(latents)[0]
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    # float32 sigmas computed two ways may differ in the last bit; allow one grey level of rounding.
    assert difference.max() <= 1
