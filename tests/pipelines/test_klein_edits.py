"""Edits at any input size: the working geometry, the round trip back to the input's exact size, text_mode at 1 MP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from pipelines.flux2_klein import (
    MAX_ASPECT,
    MIN_WORKING_SIDE,
    MULTIPLE,
    WORKING_AREA,
    edit_geometry,
    prepare_edit_input,
    restore_edit_output,
)
from pipelines.scheduling import image_tokens

pytestmark = pytest.mark.pipelines


def gradient(width: int, height: int) -> Image.Image:
    """A smooth picture whose colour encodes position (red: x, green: y), so misplacement shows as error."""
    # Integer ramps broadcast into uint8: a 4096x4096 picture in milliseconds rather than seconds.
    x = (np.arange(width, dtype=np.uint32) * 255 // max(width - 1, 1))[None, :]
    y = (np.arange(height, dtype=np.uint32) * 255 // max(height - 1, 1))[:, None]
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = x
    pixels[..., 1] = y
    pixels[..., 2] = (x + y) // 2
    return Image.fromarray(pixels)


def assert_valid_working_size(size: tuple[int, int]) -> None:
    width, height = size
    assert width % MULTIPLE == 0 and height % MULTIPLE == 0
    assert min(width, height) >= MIN_WORKING_SIDE
    assert width * height <= WORKING_AREA
    assert max(width / height, height / width) <= MAX_ASPECT


# -- pure geometry ---------------------------------------------------------------------------------------

SIDES = (64, 65, 100, 333, 600, 1000, 1023, 1500, 4096)


@pytest.mark.parametrize("upscale", (False, True))
def test_working_size_is_always_valid(upscale):
    for width in SIDES:
        for height in SIDES:
            geometry = edit_geometry(width, height, upscale=upscale)
            assert_valid_working_size(geometry.working_size)
            canvas_w, canvas_h = geometry.canvas_size
            # The canvas holds the whole input and is only widened when the input is beyond 8:1.
            assert canvas_w >= width and canvas_h >= height
            assert max(canvas_w / canvas_h, canvas_h / canvas_w) <= MAX_ASPECT
            if max(width / height, height / width) <= MAX_ASPECT:
                assert geometry.canvas_size == (width, height)
            if not upscale:
                assert geometry.working_size[0] <= canvas_w and geometry.working_size[1] <= canvas_h


def test_upscale_fills_the_working_area():
    for width, height in ((64, 64), (100, 80), (64, 512), (1500, 1000), (4096, 64)):
        work_w, work_h = edit_geometry(width, height, upscale=True).working_size
        assert work_w * work_h == pytest.approx(WORKING_AREA, rel=0.10)


@pytest.mark.parametrize(("width", "height"), [(640, 64), (64, 640), (650, 64), (4096, 64), (64, 4096)])
def test_letterbox_centres_the_input(width, height):
    geometry = edit_geometry(width, height)
    x0, y0 = geometry.offset
    right = geometry.canvas_size[0] - width - x0
    bottom = geometry.canvas_size[1] - height - y0
    assert abs(x0 - right) <= 1 and abs(y0 - bottom) <= 1
    assert min(x0, y0) == 0  # only the short side is padded


def test_letterbox_repeats_edge_pixels_around_the_untouched_input():
    # 640x64 letterboxes to exactly 640x80, a valid working size, so no resampling blurs the check.
    picture = gradient(640, 64)
    geometry = edit_geometry(*picture.size)
    assert geometry.canvas_size == geometry.working_size == (640, 80)
    assert geometry.offset == (0, 8)
    canvas = np.asarray(prepare_edit_input(picture, geometry))
    source = np.asarray(picture)
    assert np.array_equal(canvas[8:72], source)
    assert np.array_equal(canvas[:8], np.repeat(source[:1], 8, axis=0))
    assert np.array_equal(canvas[72:], np.repeat(source[-1:], 8, axis=0))


@pytest.mark.parametrize(
    ("width", "height", "upscale"),
    [
        (1500, 1000, False),
        (4096, 64, False),
        (64, 4096, False),
        (64, 600, False),
        (100, 70, False),
        (2000, 100, False),
        (100, 80, True),
        (600, 64, True),
    ],
)
def test_restore_undoes_prepare(width, height, upscale):
    picture = gradient(width, height)
    geometry = edit_geometry(width, height, upscale=upscale)
    working = prepare_edit_input(picture, geometry)
    assert working.size == geometry.working_size
    restored = restore_edit_output(working, geometry)
    assert restored.size == (width, height)
    difference = np.abs(np.asarray(restored, dtype=np.float32) - np.asarray(picture, dtype=np.float32))
    # Position is encoded in the colours, so an offset or scale error of even a pixel or two shows up here.
    assert difference.mean() < 1.0
    assert difference.max() <= 4


def test_restore_is_a_no_op_when_nothing_was_resized():
    picture = gradient(96, 64)
    geometry = edit_geometry(*picture.size)
    assert geometry.working_size == (96, 64)
    assert restore_edit_output(picture, geometry) is picture


# -- through the pipeline --------------------------------------------------------------------------------

ROUND_TRIP_SIZES = [(64, 64), (100, 70), (64, 600), (600, 64), (4096, 64), (1500, 1000), (4096, 4096)]


@pytest.mark.parametrize(("width", "height"), ROUND_TRIP_SIZES)
def test_edit_output_has_the_inputs_exact_size(klein_backend, spy, small, width, height):
    result = klein_backend.generate(small(f"edit {width}x{height}", image=gradient(width, height), steps=1))
    assert [image.size for image in result.images] == [(width, height)]
    assert result.images[0].mode == "RGB"
    working = result.details["working_size"]
    assert_valid_working_size(working)
    # The transformer saw the noisy latents plus the reference image, both at the working size.
    assert spy.pass_tokens == [2 * image_tokens(working[1], working[0])]


def test_text_mode_edits_at_one_megapixel(klein_backend, spy, small):
    picture = gradient(100, 80)

    plain = klein_backend.generate(small("an edit with a sign", image=picture, steps=1))
    plain_w, plain_h = plain.details["working_size"]
    assert (plain_w, plain_h) == (96, 80)
    assert spy.pass_tokens == [2 * image_tokens(plain_h, plain_w)]

    spy.reset()
    sharp = klein_backend.generate(small("an edit with a sign", image=picture, steps=1, text_mode=True))
    sharp_w, sharp_h = sharp.details["working_size"]
    assert sharp_w % MULTIPLE == 0 and sharp_h % MULTIPLE == 0
    assert sharp_w * sharp_h == pytest.approx(WORKING_AREA, rel=0.10)
    assert math.isclose(sharp_w / sharp_h, 100 / 80, rel_tol=0.05)
    # Not just reported: the transformer really ran on the 1 MP token count.
    assert spy.pass_tokens == [2 * image_tokens(sharp_h, sharp_w)]

    assert plain.images[0].size == sharp.images[0].size == (100, 80)
    assert plain.images[0].tobytes() != sharp.images[0].tobytes()
