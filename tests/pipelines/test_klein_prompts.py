"""What reaches the text encoder and the transformer: CFG, the prompt cache and text_mode's prompt rewrite."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.flux2_klein import Flux2KleinBackend, RunOptions, quoted_spans, text_mode_prompt

pytestmark = pytest.mark.pipelines

STEPS = 2


# -- classifier-free guidance ----------------------------------------------------------------------------


def test_cfg_one_is_one_pass_per_step_and_never_encodes_the_negative(klein_backend, spy, small):
    result = klein_backend.generate(small("cfg one", steps=STEPS, cfg_scale=1.0, negative_prompt="blurry"))
    assert spy.passes == STEPS
    assert spy.encoded == ["cfg one"]
    assert result.details["transformer_passes_per_step"] == 1
    assert result.details["negative_prompt_encoded"] is False


def test_cfg_above_one_is_two_passes_per_step_with_the_negative(klein_backend, spy, small):
    result = klein_backend.generate(small("cfg three", steps=STEPS, cfg_scale=3.0, negative_prompt="blurry"))
    assert spy.passes == 2 * STEPS
    assert spy.encoded == ["cfg three", "blurry"]
    assert result.details["transformer_passes_per_step"] == 2
    assert result.details["negative_prompt_encoded"] is True


def test_cfg_without_negative_prompt_encodes_the_empty_prompt(klein_backend, spy, small):
    klein_backend.generate(small("cfg three, no negative", steps=STEPS, cfg_scale=3.0))
    assert spy.passes == 2 * STEPS
    assert spy.encoded == ["cfg three, no negative", ""]


def test_cfg_changes_pixels(klein_backend, small):
    plain = klein_backend.generate(small("guidance changes pixels", cfg_scale=1.0)).images[0]
    guided = klein_backend.generate(small("guidance changes pixels", cfg_scale=3.0)).images[0]
    assert plain.tobytes() != guided.tobytes()


def test_negative_prompt_matters_only_with_cfg(klein_backend, small):
    def pixels(cfg_scale: float, negative_prompt: str) -> bytes:
        request = small("a negative prompt test", cfg_scale=cfg_scale, negative_prompt=negative_prompt)
        return klein_backend.generate(request).images[0].tobytes()

    assert pixels(3.0, "blurry") != pixels(3.0, "")
    assert pixels(1.0, "blurry") == pixels(1.0, "")


# -- prompt cache ----------------------------------------------------------------------------------------


def test_same_prompt_is_encoded_once(klein_backend, spy, small):
    first = klein_backend.generate(small("cached prompt", seed=1)).images[0]
    second = klein_backend.generate(small("cached prompt", seed=1)).images[0]
    assert spy.encoded == ["cached prompt"]
    # The cached embedding paints exactly what a fresh encode painted.
    assert first.tobytes() == second.tobytes()


def test_negative_prompt_shares_the_cache(klein_backend, spy, small):
    klein_backend.generate(small("shared cache", cfg_scale=2.0, negative_prompt="shared cache"))
    assert spy.encoded == ["shared cache"]


def test_cached_embeddings_carry_no_autograd_graph(klein_backend, spy, small):
    klein_backend.generate(small("no graph kept", cfg_scale=2.0))
    assert klein_backend._prompt_cache
    for embeds in klein_backend._prompt_cache.values():
        assert not embeds.requires_grad
        assert embeds.grad_fn is None


def small_cache_backend(klein_backend, size: int) -> Flux2KleinBackend:
    # A second backend over the same loaded pipeline: only the cache bound differs, and the spy's hooks
    # on the shared modules still see every encode.
    options = RunOptions(prompt_cache_size=size)
    return Flux2KleinBackend(klein_backend.pipe, klein_backend.spec, options, klein_backend.info)


def test_cache_is_bounded_least_recently_used_first(klein_backend, spy):
    backend = small_cache_backend(klein_backend, 2)
    for prompt in ("one", "two", "one", "three"):
        backend.encode_prompt(prompt)
    # "one" was used again after "two", so "two" is the one evicted when "three" arrives.
    assert list(backend._prompt_cache) == ["one", "three"]
    assert spy.encoded == ["one", "two", "three"]
    backend.encode_prompt("two")
    assert spy.encoded == ["one", "two", "three", "two"]
    assert len(backend._prompt_cache) == 2


def test_cache_size_zero_disables_caching(klein_backend, spy):
    backend = small_cache_backend(klein_backend, 0)
    backend.encode_prompt("uncached")
    backend.encode_prompt("uncached")
    assert spy.encoded == ["uncached", "uncached"]
    assert not backend._prompt_cache


# -- text_mode: the prompt rewrite -------------------------------------------------------------------------

QUOTED = [
    ('a shop sign that says "OPEN"', ["OPEN"]),
    ("a poster reading “Grand Sale” in red", ["Grand Sale"]),
    ("une affiche «Bonjour Paris»", ["Bonjour Paris"]),
    ("看板に「東京駅」と書いてある", ["東京駅"]),
    ('two labels "LEFT" and «RIGHT»', ["LEFT", "RIGHT"]),
]


@pytest.mark.parametrize(("prompt", "spans"), QUOTED)
def test_text_mode_restates_quoted_text(prompt, spans):
    assert quoted_spans(prompt) == spans
    rewritten = text_mode_prompt(prompt)
    assert rewritten.startswith(prompt)
    restated = rewritten[len(prompt) :]
    # Each quoted string appears again, verbatim, in the added instruction.
    for span in spans:
        assert f'"{span}"' in restated
    assert "letter for letter" in restated


def test_text_mode_without_quotes_asks_for_legible_text():
    prompt = "a cat on a red chair"
    rewritten = text_mode_prompt(prompt)
    assert rewritten.startswith(prompt)
    assert rewritten != prompt
    assert "legible" in rewritten[len(prompt) :]


@pytest.mark.parametrize("prompt", ['a sign that says "hello world"', "a street with shop signs"])
def test_text_mode_changes_what_the_text_encoder_receives(klein_backend, spy, small, prompt):
    plain = klein_backend.generate(small(prompt)).images[0]
    assert spy.encoded == [prompt]
    spy.reset()
    rewritten = klein_backend.generate(small(prompt, text_mode=True))
    assert spy.encoded == [text_mode_prompt(prompt)]
    assert rewritten.details["prompt_sent"] == text_mode_prompt(prompt)
    assert rewritten.images[0].tobytes() != plain.tobytes()


def test_text_mode_does_not_touch_the_negative_prompt(klein_backend, spy, small):
    klein_backend.generate(small('a label "A1"', text_mode=True, cfg_scale=2.0, negative_prompt="smudged"))
    assert spy.encoded == [text_mode_prompt('a label "A1"'), "smudged"]


def test_timings_and_details(klein_backend, small):
    for cfg_scale, passes in ((1.0, 1), (2.5, 2)):
        result = klein_backend.generate(small("timings", cfg_scale=cfg_scale))
        assert set(result.timings_ms) >= {"encode_prompt", "denoise", "decode"}
        assert all(np.isfinite(value) and value >= 0 for value in result.timings_ms.values())
        assert result.details["transformer_passes_per_step"] == passes
        assert result.details["working_size"] == (64, 64)
