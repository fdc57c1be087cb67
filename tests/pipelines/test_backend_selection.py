"""How `stepimage serve` settings pick and load a backend: tiny, flux2-klein from a directory, auto."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipelines.base import GenerationRequest, ModelLoadError
from pipelines.tiny import save_tiny_pipeline
from server.backends import load_backend, resolve_dtype_name
from server.config import Settings

pytestmark = pytest.mark.pipelines


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    # A diffusers-layout checkpoint directory, as `--weights-dir DIR` would point at.
    return save_tiny_pipeline(tmp_path_factory.mktemp("weights") / "flux2-klein-4b")


def test_flux2_klein_serves_a_checkpoint_directory(weights_dir):
    backend = load_backend(Settings(backend="flux2-klein", weights_dir=weights_dir, device="cpu", compile=False))
    assert (backend.info.backend, backend.info.random_weights) == ("flux2-klein", False)
    result = backend.generate(GenerationRequest(prompt="x", seed=1, steps=1, height=64, width=64))
    assert result.images[0].size == (64, 64)


def test_flux2_klein_finds_a_checkpoint_below_the_weights_dir(weights_dir):
    backend = load_backend(Settings(backend="flux2-klein", weights_dir=weights_dir.parent, device="cpu"))
    assert backend.info.model == "flux2-klein-4b"


def test_missing_weights_say_where_and_how_to_fetch(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_backend(Settings(backend="flux2-klein", weights_dir=tmp_path, device="cpu"))
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "stepimage weights pull flux2-klein-4b" in message


def test_unknown_checkpoint_is_refused_with_the_settings_whatever_the_backend(tmp_path):
    # At start, before anything loads: a typo is an error even where the backend would never read it (tiny).
    for backend in ("flux2-klein", "tiny", "auto"):
        with pytest.raises(ValidationError, match="flux2-klein-base-4b"):
            Settings(backend=backend, checkpoint="sdxl", weights_dir=tmp_path, device="cpu")
    # Settings built around validation still cannot load an unknown checkpoint.
    unchecked = Settings(backend="flux2-klein", weights_dir=tmp_path, device="cpu").model_copy(
        update={"checkpoint": "sdxl"}
    )
    with pytest.raises(ModelLoadError, match="flux2-klein-base-4b"):
        load_backend(unchecked)


def test_auto_without_cuda_serves_tiny_and_says_so(caplog):
    backend = load_backend(Settings(backend="auto", device="cpu"))
    assert backend.info.backend == "tiny"
    assert "TINY RANDOM-WEIGHT" in caplog.text


def test_dtype_defaults_per_device():
    assert resolve_dtype_name(Settings(), "cpu") == "fp32"
    assert resolve_dtype_name(Settings(dtype="fp16"), "cuda:0") == "fp16"
