"""Previews, masks and several reference images, on the real diffusers pipeline built tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import flux2_klein, masks
from pipelines.base import GenerationRequest
from pipelines.flux2_klein import preview_steps
from tests.conftest import assert_same_image_across_batches

pytestmark = pytest.mark.pipelines


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    plane = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    plane[y0:y1, x0:x1] = 255
    return Image.fromarray(plane)


def run_collecting(backend, request):
    previews = []
    (result,) = backend.generate_batch([request], None, progress=lambda index, partial: previews.append(partial))
    return result, previews


# -- previews --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "wanted", "expected"),
    [(8, 3, [1, 3, 5]), (8, 1, [3]), (4, 2, [0, 2]), (2, 3, [0]), (1, 3, []), (8, 0, [])],
)
def test_previews_are_evenly_spaced_and_never_the_final_step(steps, wanted, expected):
    assert preview_steps(steps, wanted) == expected


def test_the_preview_after_step_one_of_two_is_the_one_step_image(klein_backend, small, monkeypatch):
    """Both schedules start at sigma 1 from the same noise, so after the first step the predicted clean latent of a
    2-step run is exactly where a 1-step run ends: a preview is the model's estimate of the final image, not the
    noisy latent."""
    monkeypatch.setattr(flux2_klein, "PREVIEW_POOL", 1)  # compare full-resolution decodes
    one_step = klein_backend.generate(small("a lighthouse", steps=1, height=128, width=128))
    _, previews = run_collecting(klein_backend, small("a lighthouse", steps=2, height=128, width=128, partial_images=1))
    (preview,) = previews
    assert (preview.index, preview.step, preview.steps) == (0, 1, 2)
    difference = np.abs(np.asarray(preview.images[0], np.int16) - np.asarray(one_step.images[0], np.int16))
    assert difference.max() <= 1, difference.max()


def test_previews_have_the_final_size_one_per_image_and_are_counted(klein_backend, small):
    result, previews = run_collecting(klein_backend, small("kites", steps=4, n=2, partial_images=2))
    assert [preview.index for preview in previews] == [0, 1]
    assert all(len(preview.images) == 2 for preview in previews)
    assert all(picture.size == (64, 64) for preview in previews for picture in preview.images)
    assert result.details["previews"] == 2
    assert result.timings_ms["previews"] > 0


def test_edit_previews_have_the_input_size(klein_backend, small):
    source = noise_picture(150, 100)
    result, previews = run_collecting(klein_backend, small("edit", image=source, steps=3, partial_images=1))
    assert [picture.size for picture in previews[0].images] == [(150, 100)]
    assert result.images[0].size == (150, 100)


class OneRequestGone:
    """A batch's cancel signal where some requests have left while the batch runs on for the others."""

    def __init__(self) -> None:
        self.gone: set[int] = set()

    def is_set(self) -> bool:
        return False

    def request_cancelled(self, index: int) -> bool:
        return index in self.gone


def test_a_request_gone_from_a_running_batch_gets_no_more_previews(klein_backend, small, monkeypatch):
    decoded_rows = []
    decode_preview = flux2_klein._DenoisingLoop.decode_preview

    def counting(loop, latents):
        decoded_rows.append(latents.shape[0])
        return decode_preview(loop, latents)

    monkeypatch.setattr(flux2_klein._DenoisingLoop, "decode_preview", counting)
    cancel = OneRequestGone()
    previews = []

    def receive(index, partial):
        previews.append(index)
        # The first request's client leaves once it has its first preview.
        cancel.gone.add(0)

    first = small("leaves", seed=1, steps=4, n=2, partial_images=3)
    second = small("stays", seed=2, steps=4, partial_images=3)
    results = klein_backend.generate_batch([first, second], cancel, progress=receive)
    # Previews after steps 1, 2 and 3 of 4: both requests at the first, then only the one still there, its one row.
    assert previews == [0, 1, 1, 1]
    assert decoded_rows == [2, 1, 1, 1]
    # The batch ran on: both requests have their images.
    assert [len(result.images) for result in results] == [2, 1]


def test_no_previews_without_a_progress_receiver(klein_backend, small):
    result = klein_backend.generate(small("quiet", steps=3, partial_images=2))
    assert result.details["previews"] == 0 and "previews" not in result.timings_ms


# -- masks -----------------------------------------------------------------------------------------


def test_feathered_alpha_is_solid_inside_a_ramp_outside_and_zero_beyond():
    mask = box_mask(60, 40, (20, 10, 40, 30))
    alpha = masks.feathered_alpha(mask, radius=3).astype(int)
    assert (alpha[10:30, 20:40] == 255).all()
    # Pixels more than 2 * radius away from the mask are exactly 0.
    assert (alpha[:, :14] == 0).all() and (alpha[:, 47:] == 0).all()
    assert (alpha[:4, :] == 0).all() and (alpha[37:, :] == 0).all()
    # The ramp falls off with distance.
    row = alpha[20, 40:47]
    assert list(row) == sorted(row, reverse=True) and row[0] > 0


def test_token_weights_free_every_touched_patch_and_one_more_around_it():
    # One masked pixel in the patch at token (row 1, column 2) of a 4x4-token canvas.
    plane = np.zeros((64, 64), dtype=np.uint8)
    plane[20, 40] = 255
    keep = masks.token_keep_weights(Image.fromarray(plane)).reshape(4, 4)
    freed = keep == 0
    assert freed[0:3, 1:4].all()
    assert int(freed.sum()) == 9


@pytest.mark.parametrize(
    ("size", "box", "text_mode"),
    [
        ((300, 200), (100, 50, 180, 100), False),  # resized to multiples of 16
        ((96, 64), (10, 10, 40, 30), True),  # upscaled to the full area by text_mode
        ((1000, 90), (400, 20, 500, 60), False),  # past 8:1, letterboxed
        ((1500, 1100), (200, 300, 700, 600), False),  # downscaled to about 1 MP
    ],
)
def test_masked_edit_keeps_every_pixel_beyond_the_feather_exactly(klein_backend, small, size, box, text_mode):
    source = noise_picture(*size, seed=3)
    mask = box_mask(*size, box)
    result = klein_backend.generate(small("repaint", image=source, mask=mask, steps=2, text_mode=text_mode))
    out = np.asarray(result.images[0], np.int16)
    original = np.asarray(source, np.int16)
    assert out.shape == original.shape
    working = flux2_klein.edit_geometry(*size, upscale=text_mode).working_size
    radius = masks.feather_radius(size, working)
    x0, y0, x1, y1 = box
    beyond = np.ones(out.shape[:2], dtype=bool)
    beyond[max(0, y0 - 2 * radius) : y1 + 2 * radius, max(0, x0 - 2 * radius) : x1 + 2 * radius] = False
    assert np.array_equal(out[beyond], original[beyond])
    # Inside the mask the model painted (noise in, noise out: essentially every pixel differs).
    assert (np.abs(out[y0:y1, x0:x1] - original[y0:y1, x0:x1]).max(axis=2) > 0).mean() > 0.9
    assert result.details["masked"] is True


def test_the_mask_is_applied_in_the_denoising_loop_not_only_in_pixels(klein_backend, small, monkeypatch):
    """Outside the mask the latents are reset to the input's own latents at every step, so even without the pixel
    composite the decoded picture far from the mask is the input's VAE reconstruction, much closer to the input than
    the same edit without a mask, which repainted everything."""
    source = noise_picture(128, 128, seed=4)
    mask = box_mask(128, 128, (32, 32, 64, 64))
    monkeypatch.setattr(masks, "composite", lambda generated, original, alpha: generated)
    masked = klein_backend.generate(small("blend", image=source, mask=mask, steps=3)).images[0]
    unmasked = klein_backend.generate(small("blend", image=source, steps=3)).images[0]
    far = (slice(96, 128), slice(96, 128))
    reconstruction_gap = np.abs(np.asarray(masked, np.int16)[far] - np.asarray(source, np.int16)[far]).mean()
    free_gap = np.abs(np.asarray(unmasked, np.int16)[far] - np.asarray(source, np.int16)[far]).mean()
    assert reconstruction_gap < free_gap


# -- several reference images ----------------------------------------------------------------------


def test_references_reach_the_transformer_and_change_the_result(klein_backend, small, spy):
    source = noise_picture(96, 64, seed=1)
    reference = noise_picture(64, 64, seed=2)
    alone = klein_backend.generate(small("combine", image=source, steps=1))
    spy.reset()
    together = klein_backend.generate(small("combine", image=source, references=(reference,), steps=1))
    # Output tokens (6x4) + the edited image (6x4) + the reference (4x4).
    assert spy.pass_tokens == [24 + 24 + 16]
    other = klein_backend.generate(small("combine", image=source, references=(noise_picture(64, 64, 9),), steps=1))
    assert together.images[0].size == (96, 64)
    assert together.details["usage"]["image_tokens"] == 40
    assert not np.array_equal(np.asarray(together.images[0]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(together.images[0]), np.asarray(other.images[0]))


def test_batched_rows_keep_their_own_references_masks_and_previews(klein_backend, small):
    first = small(
        "one", seed=1, image=noise_picture(96, 64, 1), references=(noise_picture(64, 64, 2),), steps=2, partial_images=1
    )
    second = small(
        "two",
        seed=2,
        image=noise_picture(96, 64, 3),
        references=(noise_picture(64, 64, 4),),
        mask=box_mask(96, 64, (0, 0, 48, 32)),
        steps=2,
    )
    assert klein_backend.batch_key(first) == klein_backend.batch_key(second)
    previews = []
    batched = klein_backend.generate_batch([first, second], None, progress=lambda i, p: previews.append(i))
    for request, result in zip((first, second), batched):
        solo = klein_backend.generate(request)
        assert_same_image_across_batches(result.images[0], solo.images[0])
    assert previews == [0]


def test_reference_sizes_are_part_of_the_batch_key(klein_backend, small):
    source = noise_picture(96, 64)
    one = small("x", image=source, references=(noise_picture(64, 64),))
    other = small("x", image=source, references=(noise_picture(128, 64),))
    assert klein_backend.batch_key(one) != klein_backend.batch_key(other)
    assert klein_backend.batch_key(one) != klein_backend.batch_key(small("x", image=source))


def test_usage_counts_the_prompt_tokens_the_encoder_read(klein_backend, small):
    short = klein_backend.generate(small("cat", steps=1)).details["usage"]
    longer = klein_backend.generate(small("a cat wearing a hat on a boat", steps=1)).details["usage"]
    with_cfg = klein_backend.generate(small("cat", steps=1, cfg_scale=2.0, negative_prompt="blurry")).details["usage"]
    assert longer["text_tokens"] > short["text_tokens"] > 0
    assert with_cfg["text_tokens"] > short["text_tokens"]
    assert short["output_tokens"] == 16 and short["image_tokens"] == 0
    assert torch.is_tensor(klein_backend.encode_prompt("cat"))


def test_previews_masks_and_references_compile_nothing_after_warm_up():
    """Pooled preview decodes, the masked blend and extra reference tokens must not make a warmed-up compiled server
    recompile: on a GPU that is seconds of stall on a live request. Counted with the CPU aot_eager backend."""
    from torch._dynamo.utils import counters

    from pipelines.flux2_klein import RunOptions
    from pipelines.tiny import load_tiny_backend

    torch._dynamo.reset()
    compiled = load_tiny_backend(RunOptions(compile=True, compile_backend="aot_eager"))
    compiled.warm_up([(64, 64), (96, 128)], edit_sizes=((96, 64), (128, 96)))
    counters.clear()
    previews = []
    compiled.generate_batch(
        [GenerationRequest(prompt="p", seed=1, steps=3, height=128, width=96, partial_images=2)],
        None,
        progress=lambda index, partial: previews.append(partial),
    )
    source = noise_picture(112, 80)
    compiled.generate(
        GenerationRequest(prompt="m", seed=1, steps=2, image=source, mask=box_mask(112, 80, (8, 8, 40, 40)))
    )
    compiled.generate(
        GenerationRequest(
            prompt="r", seed=1, steps=2, image=source, references=(noise_picture(64, 96), noise_picture(80, 80))
        )
    )
    assert len(previews) == 2
    assert counters["stats"]["unique_graphs"] == 0
