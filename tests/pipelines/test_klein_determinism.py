"""Seeds decide pixels exactly; n images are n seeds; a cancel event stops the denoising loop."""

from __future__ import annotations

import threading

import pytest

from pipelines.base import SEED_RANGE, Cancelled
from pipelines.flux2_klein import RunOptions
from pipelines.tiny import load_tiny_backend
from tests.conftest import assert_same_image_across_batches

pytestmark = pytest.mark.pipelines


def pixels(backend, request, **kwargs) -> list[bytes]:
    return [image.tobytes() for image in backend.generate(request, **kwargs).images]


# -- determinism -----------------------------------------------------------------------------------------


def test_same_request_and_seed_give_identical_pixels(klein_backend, small):
    request = small("the same request twice", seed=11)
    assert pixels(klein_backend, request) == pixels(klein_backend, request)


def test_identical_across_separately_loaded_backends(klein_backend, small):
    # Weights come from a fixed seed and noise from a CPU generator: a second load paints the same.
    other = load_tiny_backend(RunOptions())
    for request in (small("two loads, one picture", seed=12), small("two loads, cfg", seed=12, cfg_scale=2.0)):
        assert pixels(other, request) == pixels(klein_backend, request)


def test_different_seed_gives_different_pixels(klein_backend, small):
    assert pixels(klein_backend, small("seed matters", seed=1)) != pixels(klein_backend, small("seed matters", seed=2))


def test_n_images_are_consecutive_seeds(klein_backend, small):
    result = klein_backend.generate(small("three at once", seed=40, n=3))
    assert result.seeds == [40, 41, 42]
    assert len(result.images) == 3
    # The three images are one batch of three rows (the engine's batching mechanism).
    for index, image in enumerate(result.images):
        alone = klein_backend.generate(small("three at once", seed=40 + index)).images[0]
        assert_same_image_across_batches(image, alone)
    # Three different seeds, three different pictures.
    assert len({image.tobytes() for image in result.images}) == 3


def test_seeds_wrap_inside_the_seed_range(klein_backend, small):
    last = SEED_RANGE - 1
    assert last == 2147483647
    result = klein_backend.generate(small("wrapping seeds", seed=last, n=2))
    assert result.seeds == [last, 0]
    assert_same_image_across_batches(
        result.images[0], klein_backend.generate(small("wrapping seeds", seed=last)).images[0]
    )
    assert_same_image_across_batches(
        result.images[1], klein_backend.generate(small("wrapping seeds", seed=0)).images[0]
    )


# -- cancellation ----------------------------------------------------------------------------------------


def test_cancel_already_set_runs_no_denoising(klein_backend, spy, small):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        klein_backend.generate(small("cancelled before it starts", n=2), cancel=cancel)
    assert spy.passes == 0


@pytest.mark.parametrize("cfg_scale", (1.0, 3.0))
def test_cancel_mid_run_stops_at_the_next_step(klein_backend, spy, small, cfg_scale):
    steps = 5
    passes_per_step = 2 if cfg_scale > 1 else 1
    cancel = threading.Event()

    def cancel_during_second_step(passes: int) -> None:
        # As a deadline or shutdown would: from outside the loop, while step 2 is still running.
        if passes == passes_per_step + 1:
            cancel.set()

    spy.after_pass = cancel_during_second_step
    request = small("cancelled halfway", steps=steps, cfg_scale=cfg_scale)
    with pytest.raises(Cancelled):
        klein_backend.generate(request, cancel=cancel)
    # Step 2 finishes (its passes are in flight), then the step-end check stops the loop.
    assert spy.passes == 2 * passes_per_step < steps * passes_per_step


def test_cancel_during_a_batch_starts_no_further_image(klein_backend, spy, small):
    steps = 2
    cancel = threading.Event()

    def cancel_in_first_images_last_step(passes: int) -> None:
        if passes == steps:
            cancel.set()

    spy.after_pass = cancel_in_first_images_last_step
    with pytest.raises(Cancelled):
        klein_backend.generate(small("a batch cut short", steps=steps, n=3), cancel=cancel)
    assert spy.passes == steps


def test_backend_is_unharmed_after_a_cancel(klein_backend, spy, small):
    request = small("after a cancel", steps=3, seed=5)
    before = pixels(klein_backend, request)
    cancel = threading.Event()
    spy.reset()
    spy.after_pass = lambda passes: cancel.set() if passes == 1 else None
    with pytest.raises(Cancelled):
        klein_backend.generate(request, cancel=cancel)
    spy.after_pass = None
    # An unset event changes nothing either.
    assert pixels(klein_backend, request, cancel=threading.Event()) == before
