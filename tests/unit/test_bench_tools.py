"""Benchmark command-line points that need no model: missing extras, size order, variants, rates, drift maths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import hardware, memory, pipeline
from tests.e2e.conftest import REPO_ROOT

pytestmark = pytest.mark.unit


def test_bench_serving_without_httpx_names_the_extra_instead_of_a_traceback():
    # A plain install: importing httpx fails (None in sys.modules makes `import httpx` raise ImportError).
    code = "import sys; sys.modules['httpx'] = None; from server.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "bench", "serving", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "stepimage bench serving needs httpx" in done.stderr and "pip install 'stepimage[bench]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_serving_help_works_when_installed():
    done = subprocess.run([sys.executable, "-m", "server", "bench", "serving", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "--edit-sizes" in done.stdout


def test_sizes_are_height_by_width_everywhere():
    assert pipeline.parse_hw("768x1360") == (768, 1360)
    args = pipeline.build_parser().parse_args(["--tiny", "--out", "x.json"])
    assert "HEIGHTxWIDTH" in pipeline.build_parser().format_help()
    assert args.edit_input == "1024x1024"
    from benchmarks.serving import _edit_sizes

    assert _edit_sizes("768x1360,512x512") == ((1360, 768), (512, 512))  # (width, height) for PIL


def test_bad_sizes_and_variants_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--tiny", "--edit-input", "1024", "--out", "x.json"])
    assert exit_info.value.code == 2 and "HEIGHTxWIDTH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pipeline.main(["--tiny", "--variants", "compiled:bf16+int4", "--out", "x.json"])
    assert "options are fp8, offload, te-cpu, trim" in capsys.readouterr().err


def test_variants_parse_into_backend_options():
    variant = pipeline.parse_variant("compiled:bf16+fp8+trim+offload")
    assert (variant.compiled, variant.dtype, variant.quantize) == (True, "bf16", "fp8")
    assert variant.trim_text_encoder and variant.text_encoder_placement == "offload"
    assert variant.without_fp8 == "compiled:bf16+trim+offload"
    assert pipeline.parse_variant("eager:fp32+te-cpu").text_encoder_placement == "cpu"
    with pytest.raises(ValueError):
        pipeline.parse_variant("eager:bf16+offload+te-cpu")


def test_datasheet_rates_match_the_device_names_torch_reports():
    assert hardware.datasheet_tflops("NVIDIA H100 80GB HBM3") == {"bf16": 989.0, "fp8": 1979.0}
    assert hardware.datasheet_tflops("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert hardware.datasheet_tflops("NVIDIA H200")["bf16"] == 989.0
    assert hardware.datasheet_tflops("NVIDIA A100-SXM4-80GB") == {"bf16": 312.0, "fp8": None}
    assert hardware.datasheet_tflops("NVIDIA L40S")["bf16"] == 362.0
    assert hardware.datasheet_tflops("Tesla T4") is None
    # The README's paper floor divides by a measured H200 rate, not the datasheet's 989.
    assert hardware.REFERENCE_MEASURED_BF16["tflops"] == 790.0


def test_matmul_rate_is_measured_on_the_cpu_too():
    measured = hardware.measure_matmul_tflops("cpu", size=128, repeats=3)
    assert measured["dtype"] == "fp32" and measured["tflops"] > 0 and "fp8_rowwise_tflops" not in measured


def test_fp8_floor_splits_linear_and_attention_flops():
    flops = {"total": 100e12, "linear": 80e12, "other": 20e12}
    rates = {"bf16_tflops": 800.0, "fp8_tflops": 1600.0}
    assert pipeline.floor_ms(flops, 1, rates, "none") == pytest.approx(125.0)
    assert pipeline.floor_ms(flops, 2, rates, "fp8") == pytest.approx(2 * (50.0 + 25.0))
    assert pipeline.floor_ms(flops, 1, {"bf16_tflops": 800.0}, "fp8") is None


def test_drift_maths():
    a = np.zeros((4, 4, 3))
    assert pipeline.psnr(a, a) == float("inf")
    assert pipeline.psnr(a, a + 1) == pytest.approx(20 * np.log10(255))
    reference = torch.ones(10)
    assert pipeline.relative_error(reference * 1.1, reference) == pytest.approx(0.1)
    result = pipeline.compare_samples(
        {"pixels": [a, a + 2], "latents": [reference, reference * 1.2]},
        {"pixels": [a, a], "latents": [reference, reference]},
    )
    assert result["worst_psnr_db"] == pytest.approx(20 * np.log10(255 / 2), abs=0.01)
    assert result["worst_latent_relative_error"] == pytest.approx(0.2)


def test_paper_memory_of_the_full_size_model():
    counts = memory.component_counts("flux2-klein-4b")
    # Published sizes: a 4B transformer and Qwen3-4B; the trim drops 8 of 36 layers of ~101M parameters.
    assert counts["transformer"] == pytest.approx(3.88e9, rel=0.01)
    assert counts["text_encoder"] == pytest.approx(4.02e9, rel=0.01)
    assert counts["text_encoder"] - counts["text_encoder_trimmed"] == pytest.approx(8 * 100.9e6, rel=0.01)
    modes = memory.paper_modes(counts)
    assert modes["bf16"]["gpu_weights_gb"] == pytest.approx(15.96, abs=0.01)
    assert modes["bf16+trim"]["gpu_weights_gb"] == pytest.approx(14.35, abs=0.01)
    offload = modes["bf16+trim+offload"]
    assert offload["gpu_weights_gb"] == pytest.approx(7.92, abs=0.01)
    assert offload["gpu_weights_while_encoding_gb"] == modes["bf16+trim"]["gpu_weights_gb"]
    assert offload["host_weights_gb"] == pytest.approx(6.43, abs=0.01)
    # fp8 halves the transformer's linear weights (plus one fp32 scale per output row).
    assert modes["bf16+fp8"]["gpu_weights_gb"] == pytest.approx(15.96 - 3.88, abs=0.02)
    assert memory.smallest_card(14.35) == 16 and memory.smallest_card(16.9) == 24 and memory.smallest_card(500) is None
