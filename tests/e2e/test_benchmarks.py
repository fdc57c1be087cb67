"""The benchmark tools run end to end on this CPU and write reports of the right shape (never judged on speed)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import overhead, serving
from benchmarks.stats import parse_server_timing, percentile
from tests.e2e.conftest import MAIN_KEYS

pytestmark = pytest.mark.e2e


def test_serving_benchmark_sweeps_concurrency_and_rate(base_url, tmp_path):
    out = tmp_path / "serving.json"
    argv = ["--base-url", f"{base_url}/v1", "--api-key", MAIN_KEYS[0], "--size", "64x64", "--steps", "1",
            "--concurrency", "1,2", "--rate", "20", "--requests", "3", "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert serving.main(argv) == 0
    report = json.loads(out.read_text())
    assert MAIN_KEYS[0] not in out.read_text()
    assert [point.get("concurrency", point.get("rate")) for point in report["points"]] == [1, 2, 20.0]
    for point in report["points"]:
        assert point["ok"] == point["requests"] == 3
        assert point["errors"] == {} and point["rate_429"] == 0
        latency = point["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert point["images_per_s"] > 0
        assert {"queue", "denoise", "decode", "total"} <= set(point["stages_ms_p50"])
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_serving_benchmark_drives_edits_and_counts_errors(base_url, tmp_path):
    out = tmp_path / "edits.json"
    argv = ["--base-url", f"{base_url}/v1", "--api-key", MAIN_KEYS[0], "--endpoint", "edits", "--steps", "1",
            "--requests", "2", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert serving.main(argv) == 0
    point = json.loads(out.read_text())["points"][0]
    assert point["ok"] == 2
    wrong_key = ["--base-url", f"{base_url}/v1", "--api-key", "wrong", "--size", "64x64", "--requests", "2",
                 "--warmup", "0", "--out", str(tmp_path / "denied.json")]  # fmt: skip
    assert serving.main(wrong_key) == 0
    denied = json.loads((tmp_path / "denied.json").read_text())["points"][0]
    assert denied["ok"] == 0 and denied["errors"] == {"401": 2}


def test_overhead_benchmark_reports_every_format(tmp_path):
    out = tmp_path / "overhead.json"
    assert overhead.main(["--size", "64x64", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    for content in ("model", "natural"):
        combinations = {(row["output_format"], row["response_format"]) for row in rows if row["content"] == content}
        assert combinations == set(overhead.COMBINATIONS)
    for row in rows:
        assert row["overhead_ms"]["p50"] > 0
        assert row["encode_image_ms_p50"] >= 0
        assert math.isfinite(row["overhead_without_encode_ms_p50"])


def test_stats_helpers():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile([], 50) is None
    assert parse_server_timing("queue;dur=1.5, denoise;dur=300, broken, x;dur=oops") == {"queue": 1.5, "denoise": 300.0}
