"""The full-size FLUX.2 [klein] 4B architecture with random weights on CUDA: runs, compiles once, stays compiled,
batches, guides, edits; fp8 and the offloaded text encoder on the real shapes.

Skipped without CUDA. Timings are the benchmarks' job (`stepimage bench gpu-kit`), never asserted here.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.pipeline import LatentTap
from pipelines.base import GenerationRequest
from pipelines.flux2_klein import RunOptions, load_random_weights_backend
from pipelines.quantize import fp8_problem
from weights.manifest import get_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda:0"


def full_size(**options):
    return load_random_weights_backend(
        get_checkpoint("flux2-klein-4b"), RunOptions(device=DEVICE, dtype="bf16", **options)
    )


@pytest.fixture(scope="module")
def compiled_backend():
    torch._dynamo.reset()
    backend = full_size(compile=True, trim_text_encoder=True)
    backend.warm_up([(1024, 1024), (768, 1360)])
    yield backend
    del backend
    torch.cuda.empty_cache()


def test_no_request_compiles_after_warm_up(compiled_backend):
    from torch._dynamo.utils import counters

    counters.clear()
    result = compiled_backend.generate(GenerationRequest(prompt="a lake", seed=1, steps=8, height=1184, width=896))
    assert result.images[0].size == (896, 1184)
    edit = compiled_backend.generate(
        GenerationRequest(prompt="make it red", seed=1, steps=8, image=Image.new("RGB", (1500, 900), "white"))
    )
    assert edit.images[0].size == (1500, 900)
    batch = compiled_backend.generate_batch(
        [GenerationRequest(prompt=f"lake {i}", seed=i, steps=2, height=1024, width=1024) for i in range(3)]
    )
    assert [len(r.images) for r in batch] == [1, 1, 1] and batch[0].details["batch_images"] == 3
    guided = compiled_backend.generate(
        GenerationRequest(prompt="a lake", negative_prompt="fog", seed=1, steps=2, cfg_scale=3.0)
    )
    assert guided.details["transformer_passes_per_step"] == 2
    edits = compiled_backend.generate_batch(
        [GenerationRequest(prompt=p, seed=1, steps=2, image=Image.new("RGB", (1024, 1024), c))
         for p, c in (("red", "white"), ("blue", "black"))]
    )  # fmt: skip
    assert [r.images[0].size for r in edits] == [(1024, 1024)] * 2
    # Warm-up made every dimension (sequence length, batch) dynamic: no request compiles a new graph.
    assert counters["stats"]["unique_graphs"] == 0


def test_offloaded_text_encoder_gives_the_same_embeddings_and_leaves_the_gpu(compiled_backend):
    offloaded = full_size(trim_text_encoder=True, text_encoder_placement="offload")
    home = offloaded.text_encoder_home
    text_encoder_bytes = sum(p.numel() * p.element_size() for p in offloaded.pipe.text_encoder.parameters())
    between = torch.cuda.memory_allocated(DEVICE)
    embeds = offloaded.encode_prompt('a sign that says "OPEN"')
    assert home.resident and torch.cuda.memory_allocated(DEVICE) - between >= 0.9 * text_encoder_bytes
    # The same random weights on the same device: bit-identical embeddings.
    assert torch.equal(embeds, compiled_backend.encode_prompt('a sign that says "OPEN"'))
    offloaded.generate(GenerationRequest(prompt='a sign that says "OPEN"', seed=1, steps=1, height=512, width=512))
    assert not home.resident
    assert torch.cuda.memory_allocated(DEVICE) - between < 0.1 * text_encoder_bytes
    del offloaded
    torch.cuda.empty_cache()


@pytest.mark.skipif(
    torch.cuda.is_available() and fp8_problem(DEVICE, "bf16") is not None,
    reason="fp8 cannot run on this GPU or install",
)
def test_fp8_full_size_quantizes_every_linear_layer_and_runs():
    backend = full_size(quantize="fp8", trim_text_encoder=True)
    report = backend.quantization
    # Every linear layer of the 4B transformer is fp8-aligned (both sides multiples of 16).
    assert report.quantized_layers == report.linear_layers == 109
    assert report.weight_bytes_after < 0.55 * report.weight_bytes_before
    tap = LatentTap(backend)
    result = backend.generate(GenerationRequest(prompt="a lake", seed=1, steps=4, height=1024, width=1024))
    edit = backend.generate(
        GenerationRequest(prompt="make it red", seed=1, steps=4, image=Image.new("RGB", (1024, 1024), "white"))
    )
    assert result.images[0].size == edit.images[0].size == (1024, 1024)
    assert all(torch.isfinite(latents).all() for latents in tap.latents)
    del backend
    torch.cuda.empty_cache()
