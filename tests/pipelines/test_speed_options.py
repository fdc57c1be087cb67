"""The speed options of the FLUX.2 [klein] backend: compile, text-encoder trimming, random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.base import GenerationRequest
from pipelines.flux2_klein import (
    RunOptions,
    build_pipeline_from_configs,
    load_random_weights_backend,
    trim_text_encoder,
)
from pipelines.tiny import (
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
    load_tiny_backend,
)

pytestmark = pytest.mark.pipelines


def pixels(backend, **fields) -> np.ndarray:
    request = GenerationRequest(**{"prompt": "a kite", "seed": 4, "steps": 2, "height": 64, "width": 64, **fields})
    return np.asarray(backend.generate(request).images[0], dtype=np.int16)


def test_compiled_graphs_match_eager_and_stop_recompiling_after_warm_up(tiny_backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = load_tiny_backend(RunOptions(compile=True, compile_backend="aot_eager"))
    # Two shapes that differ in both sides make every dimension dynamic (what warm_up relies on).
    pixels(compiled, height=64, width=64)
    pixels(compiled, height=96, width=128)
    counters.clear()
    for height, width in ((128, 96), (160, 64), (64, 192)):
        size = {"height": height, "width": width}
        assert np.array_equal(pixels(compiled, **size), pixels(tiny_backend, **size))
    assert counters["stats"]["unique_graphs"] == 0


def test_inductor_compile_runs_on_cpu(tiny_backend):
    torch._dynamo.reset()
    compiled = load_tiny_backend(RunOptions(compile=True))
    difference = np.abs(pixels(compiled) - pixels(tiny_backend))
    # Fused kernels reorder float maths; the images must still agree to within a couple of levels.
    assert difference.mean() < 1.0
    assert difference.max() <= 8


def test_trimmed_text_encoder_gives_identical_embeddings():
    # A text encoder deeper than the layers read, like Qwen3-4B's 36 layers read at 9, 18, 27.
    deep = dict(TEXT_ENCODER_CONFIG, num_hidden_layers=6)
    pipe = build_pipeline_from_configs(
        transformer=TRANSFORMER_CONFIG,
        text_encoder=deep,
        vae=VAE_CONFIG,
        scheduler=SCHEDULER_CONFIG,
        is_distilled=True,
    )
    layers = (1, 2, 3)
    before, _ = pipe.encode_prompt('a sign that says "OPEN"', text_encoder_out_layers=layers)
    assert trim_text_encoder(pipe.text_encoder, layers) == 2
    assert len(pipe.text_encoder.model.layers) == 4
    after, _ = pipe.encode_prompt('a sign that says "OPEN"', text_encoder_out_layers=layers)
    assert torch.equal(before, after)
    # Nothing left to drop when the last layer is read.
    assert trim_text_encoder(pipe.text_encoder, (1, 2, 4)) == 0


class TinyCheckpoint:
    """A manifest entry whose bundled configs are the tiny ones, to build 'full size' cheaply on CPU."""

    name = "tiny-as-checkpoint"

    def config(self, component):
        return {
            "transformer": TRANSFORMER_CONFIG,
            "text_encoder": TEXT_ENCODER_CONFIG,
            "vae": VAE_CONFIG,
            "scheduler": SCHEDULER_CONFIG,
            "pipeline": {"text_encoder_out_layers": [1, 2, 3], "max_sequence_length": 512, "is_distilled": True},
        }[component]


def test_random_weights_backend_is_labelled_and_generates():
    backend = load_random_weights_backend(TinyCheckpoint(), RunOptions())
    assert backend.info.random_weights is True
    assert any("RANDOM WEIGHTS" in note for note in backend.info.notes)
    assert backend.generate(GenerationRequest(prompt="x", seed=1, steps=1, height=64, width=64)).images[0].size == (
        64,
        64,
    )


def test_full_size_configs_build_the_published_architecture():
    from diffusers import Flux2Transformer2DModel

    from weights.manifest import get_checkpoint

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(get_checkpoint("flux2-klein-4b").config("transformer"))
    parameters = sum(parameter.numel() for parameter in transformer.parameters())
    assert abs(parameters - 3.88e9) / 3.88e9 < 0.01
