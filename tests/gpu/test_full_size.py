"""The full-size FLUX.2 [klein] 4B architecture with random weights on CUDA: runs, compiles once, stays compiled.

Skipped without CUDA. Timings are the benchmark's job (benchmarks/pipeline_bench.py), never asserted here.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipelines.base import GenerationRequest
from pipelines.flux2_klein import RunOptions, load_random_weights_backend
from weights.manifest import get_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def compiled_backend():
    options = RunOptions(device="cuda:0", dtype="bf16", compile=True, trim_text_encoder=True)
    return load_random_weights_backend(get_checkpoint("flux2-klein-4b"), options)


def test_full_size_text_to_image_and_edit(compiled_backend):
    from torch._dynamo.utils import counters

    compiled_backend.warm_up([(1024, 1024), (768, 1360)])
    counters.clear()
    result = compiled_backend.generate(GenerationRequest(prompt="a lake", seed=1, steps=8, height=1184, width=896))
    assert result.images[0].size == (896, 1184)
    edit = compiled_backend.generate(
        GenerationRequest(prompt="make it red", seed=1, steps=8, image=Image.new("RGB", (1500, 900), "white"))
    )
    assert edit.images[0].size == (1500, 900)
    # Warm-up made every dimension dynamic: no request compiles a new graph.
    assert counters["stats"]["unique_graphs"] == 0
