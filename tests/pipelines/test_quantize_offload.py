"""--quantize fp8 and --text-encoder-placement on CPU: refusals, plumbing, and the code paths themselves.

fp8 cannot run for real on a CPU (it is refused there), but torchao's float8 arithmetic can: with both
hardware gates bypassed, the tiny model runs the same quantize -> compile -> warm-up path as a GPU,
which shows the wiring and that compiled fp8 graphs stop recompiling after warm-up.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import quantize
from pipelines.base import GenerationRequest
from pipelines.flux2_klein import RunOptions, load_pipeline
from pipelines.offload import TextEncoderPlacement
from pipelines.quantize import QuantizationUnsupported, check_quantization, torchao_problem
from pipelines.tiny import load_tiny_backend, save_tiny_pipeline

pytestmark = pytest.mark.pipelines


# warm_up's two 1 MP edits cost seconds each on this CPU; two small inputs exercise the same code.
SMALL_EDITS = ((64, 64), (96, 80))


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a kite", "seed": 4, "steps": 2, "height": 64, "width": 64, **fields})


# -- refusals ------------------------------------------------------------------------------------


def one_line_refusal(mode: str, device: str, dtype: str) -> str:
    with pytest.raises(QuantizationUnsupported) as caught:
        check_quantization(mode, device, dtype)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_fp8_is_refused_on_cpu():
    message = one_line_refusal("fp8", "cpu", "fp32")
    assert "NVIDIA GPU of compute capability 8.9" in message and "cpu" in message


def fake_gpu(monkeypatch, capability, name="NVIDIA A100-SXM4-80GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_fp8_is_refused_on_gpus_before_ada(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    message = one_line_refusal("fp8", "cuda:0", "bf16")
    assert "8.9" in message and "A100" in message and "is 8.0" in message


def test_fp8_needs_bf16_weights(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    assert "bf16" in one_line_refusal("fp8", "cuda:0", "fp16")


def test_fp8_is_refused_without_torchao(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an install without the extra looks like
    message = one_line_refusal("fp8", "cuda:0", "bf16")
    assert "torchao is not installed" in message and "stepimage[fp8]" in message


def test_fp8_is_refused_with_an_incompatible_torch_or_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", types.SimpleNamespace(__version__="0.18.0"))
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu128")
    assert "needs torch >= 2.11" in torchao_problem()
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    monkeypatch.setitem(sys.modules, "torchao.quantization", types.ModuleType("torchao.quantization"))
    assert "lacks the float8 dynamic per-row recipe" in torchao_problem()


def test_installed_torchao_offers_the_recipe():
    # The pinned torchao imports with the torch this suite runs (the pin is checked here, not assumed).
    assert torchao_problem() is None


def test_unknown_mode_is_refused():
    assert "none, fp8" in one_line_refusal("int4", "cpu", "fp32")


def test_tiny_backend_refuses_fp8_on_cpu():
    with pytest.raises(QuantizationUnsupported, match="compute capability"):
        load_tiny_backend(RunOptions(quantize="fp8"))


def test_settings_flags_reach_run_options():
    from pydantic import ValidationError

    from server.backends import run_options
    from server.cli import build_parser, settings_from_args
    from server.config import Settings

    args = build_parser().parse_args(["serve", "--quantize", "fp8", "--text-encoder-placement", "offload"])
    options = run_options(settings_from_args(args), "cuda:0", "bf16")
    assert (options.quantize, options.text_encoder_placement) == ("fp8", "offload")
    assert run_options(Settings(), "cpu", "fp32").quantize == "none"
    with pytest.raises(ValidationError):
        Settings(quantize="int8")
    with pytest.raises(ValidationError):
        Settings(text_encoder_placement="disk")


# -- fp8 on the tiny model, with the hardware gates bypassed -------------------------------------


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """Let the CPU run torchao's float8 arithmetic: our gate and torchao's are both for real hardware."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quantize, "fp8_problem", lambda device, dtype: None)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def test_fp8_quantizes_every_linear_layer_and_compiles_without_recompiles(fp8_on_cpu):
    from torch._dynamo.utils import counters
    from torchao.quantization import Float8Tensor

    torch._dynamo.reset()
    reference = load_tiny_backend(RunOptions(dtype="bf16"))
    fp8 = load_tiny_backend(RunOptions(dtype="bf16", quantize="fp8", compile=True, compile_backend="aot_eager"))
    report = fp8.quantization
    assert report.mode == "fp8" and report.quantized_layers == report.linear_layers > 0
    linear = [m for m in fp8.pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m.weight, Float8Tensor) for m in linear)
    assert report.weight_bytes_after < report.weight_bytes_before
    # The text encoder and the VAE are untouched.
    assert not any(isinstance(p, Float8Tensor) for p in fp8.pipe.text_encoder.parameters())

    fp8.warm_up([(64, 64), (96, 128)], edit_sizes=SMALL_EDITS)
    counters.clear()
    quantized = np.asarray(fp8.generate(request(height=128, width=96)).images[0], dtype=np.float64)
    fp8.generate(request(prompt="an owl", height=64, width=192, n=2))
    assert counters["stats"]["unique_graphs"] == 0
    plain = np.asarray(reference.generate(request(height=128, width=96)).images[0], dtype=np.float64)
    # Same weights, same seed: float8 rounding moves pixels, but the picture stays the same one.
    psnr = 10 * np.log10(255**2 / np.mean((quantized - plain) ** 2))
    assert psnr > 20, psnr


def test_warm_up_leaves_nothing_to_compile_for_batches_cfg_and_edits():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    backend = load_tiny_backend(RunOptions(compile=True, compile_backend="aot_eager"))
    backend.warm_up([(64, 64), (96, 128)], edit_sizes=SMALL_EDITS)
    counters.clear()
    backend.generate_batch([request(seed=1), request(prompt="b", seed=2), request(prompt="c", seed=3)])
    backend.generate(request(cfg_scale=2.5, negative_prompt="blur"))
    backend.generate_batch(
        [request(image=Image.new("RGB", (80, 48), "red")), request(prompt="z", image=Image.new("RGB", (80, 48)))]
    )
    assert counters["stats"]["unique_graphs"] == 0


# -- text-encoder placement ----------------------------------------------------------------------


PROMPTS = ("a red kite", 'a sign that says "OPEN"', "")


def on_master(entry) -> bool:
    module, name, is_parameter, host = entry
    tensor = module._parameters[name] if is_parameter else module._buffers[name]
    return tensor.data_ptr() == host.data_ptr()


def test_offload_gives_identical_embeddings_and_moves_only_for_new_prompts(tiny_backend):
    backend = load_tiny_backend(RunOptions(text_encoder_placement="offload"))
    home = backend.text_encoder_home
    assert not home.resident and home.moves_in == 0
    for prompt in PROMPTS:
        assert torch.equal(backend.encode_prompt(prompt), tiny_backend.encode_prompt(prompt))
    # Three new prompts, one copy: the weights stay until the transformer runs.
    assert home.resident and home.moves_in == 1
    assert not any(on_master(entry) for entry in home._host)
    backend.generate(request(prompt=PROMPTS[0]))
    assert not home.resident
    # Every weight and buffer points at its CPU master again: no device copy is kept.
    assert home._host and all(on_master(entry) for entry in home._host)
    # A cached prompt costs no copy; a new one costs exactly one, whatever the batch holds.
    backend.generate(request(prompt=PROMPTS[1]))
    assert home.moves_in == 1
    backend.generate_batch([request(prompt="new one"), request(prompt="new two", seed=9)])
    assert home.moves_in == 2 and not home.resident
    offloaded = np.asarray(backend.generate(request(prompt="a lighthouse")).images[0])
    resident = np.asarray(tiny_backend.generate(request(prompt="a lighthouse")).images[0])
    assert np.array_equal(offloaded, resident)


def test_cpu_placement_encodes_on_the_cpu_and_returns_embeddings_on_the_device(tiny_backend):
    backend = load_tiny_backend(RunOptions(text_encoder_placement="cpu"))
    assert backend.text_encoder_home.encode_device == torch.device("cpu")
    assert {p.device.type for p in backend.pipe.text_encoder.parameters()} == {"cpu"}
    embeds = backend.encode_prompt(PROMPTS[1])
    assert embeds.device == backend.device
    assert torch.equal(embeds, tiny_backend.encode_prompt(PROMPTS[1]))


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="device, offload, cpu"):
        TextEncoderPlacement(torch.nn.Linear(2, 2), "disk", "cpu")


def test_loader_keeps_the_text_encoder_off_the_serving_device(tmp_path):
    # "meta" stands in for a second device: the text encoder must go there and nothing else.
    path = save_tiny_pipeline(tmp_path / "tiny")
    pipe, _ = load_pipeline(path, dtype=torch.float32, device="cpu", text_encoder_device="meta")
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"meta"}
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"cpu"}


def test_pipeline_benchmark_measures_fp8_drift_against_bf16_on_the_same_seeds(fp8_on_cpu, tmp_path):
    import json

    from benchmarks import pipeline

    out = tmp_path / "pipeline.json"
    argv = ["--tiny", "--device", "cpu", "--variants", "eager:bf16,eager:bf16+fp8", "--sizes", "64x64",
            "--edit-input", "64x64", "--steps", "2", "--repeats", "1", "--drift-cases", "2", "--matmul-size", "64",
            "--small-warm-up", "--out", str(out)]  # fmt: skip
    assert pipeline.main(argv) == 0
    variants = {entry["variant"]: entry for entry in json.loads(out.read_text())["variants"]}
    assert "drift" not in variants["eager:bf16"]
    fp8 = variants["eager:bf16+fp8"]
    assert fp8["drift_vs"] == "eager:bf16" and fp8["quantization"].startswith("fp8: 23 of 23")
    drift = fp8["drift"]
    assert drift["cases"] == 3  # two text-to-image seeds and one edit
    # Quantization changed something, and not everything.
    assert 0 < drift["worst_latent_relative_error"] < 0.5
    assert 15 < drift["worst_psnr_db"] < float("inf")
