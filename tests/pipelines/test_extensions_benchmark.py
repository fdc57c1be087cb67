"""`stepimage bench extensions` runs end to end on the tiny model and reports what it measured."""

from __future__ import annotations

import json

import pytest

from benchmarks import extensions

pytestmark = pytest.mark.pipelines


def test_extensions_benchmark_reports_previews_and_masks(tmp_path, capsys):
    out = tmp_path / "extensions.json"
    argv = ["--size", "64x64", "--edit-height", "64", "--edit-width", "96", "--steps", "3", "--repeats", "1"]
    assert extensions.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["partial_images"]["total_ms_by_partial_images"]) == {"0", "1", "2", "3"}
    assert isinstance(report["partial_images"]["added_ms_per_partial_image"], float)
    assert report["preview_decode"]["full_resolution_ms"] > 0
    assert report["mask"]["masked_edit_ms"] > 0 and report["mask"]["edit_size"] == "64x96"
    assert report["backend"]["backend"] == "tiny"
