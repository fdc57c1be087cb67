"""The pipeline benchmark on the tiny model, and the compute floor it reports for the full-size one."""

from __future__ import annotations

import json

import pytest

from benchmarks import pipeline
from weights.manifest import get_checkpoint

pytestmark = pytest.mark.pipelines


def test_pipeline_benchmark_reports_stages_steps_and_baseline(tmp_path):
    out = tmp_path / "pipeline.json"
    argv = ["--tiny", "--variants", "eager:fp32", "--sizes", "64x64", "--edit-input", "64x96", "--steps", "3",
            "--repeats", "1", "--baseline", "--peak-tflops", "1", "--small-warm-up", "--out", str(out)]  # fmt: skip
    assert pipeline.main(argv) == 0
    report = json.loads(out.read_text())
    variant = report["variants"][0]
    for case in (variant["text_to_image"]["64x64"], variant["edit"]):
        median = case["median_ms"]
        assert {"encode_prompt", "denoise", "decode", "encode_png", "encode_jpeg", "encode_webp", "total"} <= set(
            median
        )
        assert len(case["step_ms"]) == 3
        assert case["floor_step_ms"] > 0 and case["transformer_gflop_per_step"] > 0
    # --edit-input is HEIGHTxWIDTH like every size here: 64 high, 96 wide; working_size is (width, height).
    assert variant["edit"]["working_size"] == [96, 64]
    assert report["baseline_plain_diffusers"]["text_to_image"]["median_total_ms"] > 0
    assert variant["speedup_vs_plain_diffusers"]["edit"] > 0


def test_full_size_flops_per_step_match_the_published_compute_floor():
    config = get_checkpoint("flux2-klein-4b").config("transformer")
    # 1024x1024: 4096 image tokens (+4096 reference tokens for an edit) and 512 text tokens.
    text_to_image = pipeline.transformer_flops(config, 4096, 512)
    edit = pipeline.transformer_flops(config, 8192, 512)
    # At 790 TFLOP/s these are the 44 ms and 97 ms per step of the model notes.
    assert text_to_image / 790e12 * 1000 == pytest.approx(44.1, abs=0.5)
    assert edit / 790e12 * 1000 == pytest.approx(97.1, abs=0.5)
