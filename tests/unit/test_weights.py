"""The weights package: manifest, bundled configs, finding, verifying and pulling checkpoints, and its CLI.

Everything runs offline: checkpoints are small fake diffusers folders written into tmp_path, the Hugging Face
cache is a hand-built `models--org--name/snapshots/<sha>` tree, and the one test that goes through the real
huggingface_hub download code points it at a closed localhost port.
"""

from __future__ import annotations

import json
import struct
import time
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import weights
from weights import cli, store
from weights.manifest import CHECKPOINTS, DEFAULT_CHECKPOINT, UnknownCheckpoint, get_checkpoint, load_bundled_config

pytestmark = pytest.mark.unit

DISTILLED = get_checkpoint("flux2-klein-4b")
BASE = get_checkpoint("flux2-klein-base-4b")
TEXT_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _write_tensors(path: Path, names: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: np.full((2, 3), index, dtype=np.float16) for index, name in enumerate(names)}, str(path))


def write_snapshot(root: Path, *, distilled: bool = True) -> Path:
    """A fake diffusers folder holding every file the manifest expects, with tiny but valid weights."""
    configs = {
        "model_index.json": {
            "_class_name": "Flux2KleinPipeline",
            "_diffusers_version": "0.37.0.dev0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"],
            "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"],
            # The base repository's index may omit the flag: absent means non-distilled.
            **({"is_distilled": True} if distilled else {}),
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            **load_bundled_config("scheduler"),
        },
        "transformer/config.json": {"_class_name": "Flux2Transformer2DModel", **load_bundled_config("transformer")},
        "vae/config.json": {"_class_name": "AutoencoderKLFlux2", **load_bundled_config("vae")},
        "text_encoder/config.json": {"architectures": ["Qwen3ForCausalLM"], **load_bundled_config("text_encoder")},
    }
    shard_tensors = {
        TEXT_SHARDS[0]: ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"),
        TEXT_SHARDS[1]: ("model.norm.weight",),
    }
    for relative in DISTILLED.expected_files:
        target = root / relative
        if relative in configs:
            _write_json(target, configs[relative])
        elif relative.endswith(".safetensors.index.json"):
            weight_map = {tensor: shard for shard, tensors in shard_tensors.items() for tensor in tensors}
            _write_json(target, {"metadata": {"total_size": 36}, "weight_map": weight_map})
            for shard, tensors in shard_tensors.items():
                _write_tensors(target.parent / shard, tensors)
        elif relative.endswith(".safetensors"):
            _write_tensors(target, ("proj_out.weight", "proj_out.bias"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("placeholder for " + relative + "\n", encoding="utf-8")
    return root


def write_hf_cache(cache: Path, repo_id: str, sha: str, *, ref: str | None = "main") -> Path:
    """The hub cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = write_snapshot(repo / "snapshots" / sha)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha, encoding="utf-8")
    return snapshot


@pytest.fixture(autouse=True)
def isolated_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never look at a real cache or weights folder on the machine running the tests.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(store.ENV_WEIGHTS_DIR, str(tmp_path / "default-weights"))


# --- manifest and bundled configs ---------------------------------------------------------------------------


def test_manifest_names_are_unique_and_default_is_listed() -> None:
    names = [checkpoint.name for checkpoint in CHECKPOINTS]
    assert len(names) == len(set(names))
    assert DEFAULT_CHECKPOINT == "flux2-klein-4b" and DEFAULT_CHECKPOINT in names
    assert [checkpoint.name for checkpoint in CHECKPOINTS if checkpoint.is_default] == [DEFAULT_CHECKPOINT]


def test_manifest_entries_are_consistent() -> None:
    assert DISTILLED.is_distilled and DISTILLED.default_steps == 4
    assert not BASE.is_distilled and BASE.default_steps >= 28
    # The matcher snapshot_download applies to allow_patterns.
    from huggingface_hub.utils import filter_repo_objects

    for checkpoint in CHECKPOINTS:
        assert len(checkpoint.revision) == 40 and int(checkpoint.revision, 16) >= 0
        assert "model_index.json" in checkpoint.expected_files
        assert any(name.endswith(".safetensors.index.json") for name in checkpoint.expected_files)
        # Every expected file is fetched by the allow-list; the root single-file checkpoint and images are not.
        patterns = list(checkpoint.allow_patterns)
        allowed = set(filter_repo_objects(list(checkpoint.expected_files), allow_patterns=patterns))
        assert allowed == set(checkpoint.expected_files)
        assert not list(filter_repo_objects(["flux-2-klein-4b.safetensors", "teaser.jpg"], allow_patterns=patterns))


def test_get_checkpoint_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownCheckpoint) as caught:
        get_checkpoint("flux2-klein-9b")
    assert isinstance(caught.value, ValueError)
    for name in ("flux2-klein-4b", "flux2-klein-base-4b", "flux2-klein-9b"):
        assert name in str(caught.value)


def test_pipeline_config_takes_distillation_from_the_checkpoint() -> None:
    assert DISTILLED.config("pipeline") == {
        "is_distilled": True,
        "max_sequence_length": 512,
        "text_encoder_out_layers": [9, 18, 27],
    }
    assert BASE.config("pipeline")["is_distilled"] is False
    with pytest.raises(ValueError):
        load_bundled_config("unet")


def test_weights_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, weights, weights.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    repo_root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False).returncode == 0


def _param_count(module: object) -> int:
    return sum(parameter.numel() for parameter in module.parameters())  # type: ignore[attr-defined]


def test_bundled_configs_build_the_full_size_architectures_on_meta() -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    with torch.device("meta"):
        transformer = diffusers.Flux2Transformer2DModel.from_config(load_bundled_config("transformer"))
        text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**load_bundled_config("text_encoder")))
        vae = diffusers.AutoencoderKLFlux2.from_config(load_bundled_config("vae"))
    # Published bf16 weight sizes / 2: transformer 7.75 GB, text encoder 8.04 GB (index total_size, embeddings
    # tied so counted once), VAE 168 MB.
    assert _param_count(transformer) == pytest.approx(3.88e9, rel=0.02)
    assert _param_count(text_encoder) == pytest.approx(4.02e9, rel=0.02)
    assert _param_count(vae) == pytest.approx(84e6, rel=0.02)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(load_bundled_config("scheduler"))
    assert scheduler.config.use_dynamic_shifting and scheduler.config.time_shift_type == "exponential"


# --- verify -------------------------------------------------------------------------------------------------


def test_verify_accepts_a_complete_snapshot(tmp_path: Path) -> None:
    report = store.verify(write_snapshot(tmp_path / "snap"), DISTILLED)
    assert report.ok, report.summary()
    assert report.missing == [] and report.problems == []
    assert report.checked == len(DISTILLED.expected_files) + len(TEXT_SHARDS)


def test_verify_names_a_missing_file(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    (root / "vae" / "config.json").unlink()
    report = store.verify(root, DISTILLED)
    assert not report.ok
    assert report.missing == [str(root / "vae" / "config.json")]


def test_verify_names_a_missing_shard(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    (root / "text_encoder" / TEXT_SHARDS[1]).unlink()
    report = store.verify(root, DISTILLED)
    assert not report.ok
    assert report.missing == [str(root / "text_encoder" / TEXT_SHARDS[1])]


def test_verify_reports_a_tensor_absent_from_its_shard(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    index_path = root / "text_encoder" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = TEXT_SHARDS[1]
    index_path.write_text(json.dumps(index))
    report = store.verify(root, DISTILLED)
    assert not report.ok
    assert any(TEXT_SHARDS[1] in problem and "lm_head.weight" in problem for problem in report.problems)


def _garbage_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    path.write_bytes(bytes(data))


def _not_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(data))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _too_short(path: Path) -> None:
    path.write_bytes(b"\x01\x02\x03")


@pytest.mark.parametrize("damage", [_garbage_length, _not_json, _truncated, _too_short])
def test_verify_reports_a_corrupt_safetensors_file(tmp_path: Path, damage) -> None:
    root = write_snapshot(tmp_path / "snap")
    damaged = root / "transformer" / "diffusion_pytorch_model.safetensors"
    damage(damaged)
    report = store.verify(root, DISTILLED)
    assert not report.ok and report.missing == []
    assert len(report.problems) == 1 and report.problems[0].startswith(str(damaged))


def test_verify_reports_a_corrupt_shard(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    shard = root / "text_encoder" / TEXT_SHARDS[0]
    _truncated(shard)
    report = store.verify(root, DISTILLED)
    assert [problem for problem in report.problems if problem.startswith(str(shard))]
    assert "truncated" in report.problems[0]


def test_verify_reports_an_empty_file(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    (root / "tokenizer" / "tokenizer.json").write_bytes(b"")
    report = store.verify(root, DISTILLED)
    assert report.problems == [f"{root / 'tokenizer' / 'tokenizer.json'}: empty file"]


def test_verify_reports_the_wrong_pipeline_class(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    index_path.write_text(json.dumps(index))
    report = store.verify(root, DISTILLED)
    assert not report.ok
    expected = "wrong model: model_index.json says StableDiffusionXLPipeline"
    assert any(problem.startswith(expected) for problem in report.problems)


def test_verify_reports_a_distillation_mismatch(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap", distilled=True)
    report = store.verify(root, BASE)
    assert not report.ok
    assert any("is_distilled" in problem and str(root / "model_index.json") in problem for problem in report.problems)
    # The base repository's index without the flag is fine for the base checkpoint.
    assert store.verify(write_snapshot(tmp_path / "base", distilled=False), BASE).ok


def test_verify_reports_transformer_geometry_mismatch(tmp_path: Path) -> None:
    root = write_snapshot(tmp_path / "snap")
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"], config["joint_attention_dim"] = 8, 12288  # klein 9B geometry
    del config["num_single_layers"]
    config_path.write_text(json.dumps(config))
    problems = store.verify(root, DISTILLED).problems
    assert len(problems) == 3
    assert all(problem.startswith(str(config_path)) for problem in problems)
    assert any("num_layers is 8, expected 5" in problem for problem in problems)
    assert any("joint_attention_dim is 12288, expected 7680" in problem for problem in problems)
    assert any("num_single_layers is absent" in problem for problem in problems)


def test_verify_of_a_missing_directory(tmp_path: Path) -> None:
    report = store.verify(tmp_path / "nowhere", DISTILLED)
    assert not report.ok and "not a directory" in report.problems[0]


# --- find_checkpoint ----------------------------------------------------------------------------------------


def test_find_checkpoint_in_the_named_subfolder(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    snapshot = write_snapshot(weights_dir / "flux2-klein-4b")
    assert store.find_checkpoint("flux2-klein-4b", weights_dir) == snapshot


def test_find_checkpoint_in_a_direct_diffusers_folder(tmp_path: Path) -> None:
    folder = write_snapshot(tmp_path / "FLUX.2-klein-4B")
    assert store.find_checkpoint(DISTILLED, folder) == folder
    # That folder is the distilled model: it must not be taken for the base one.
    with pytest.raises(store.WeightsNotFound) as caught:
        store.find_checkpoint(BASE, folder, hf_cache=False)
    assert "is_distilled=true" in str(caught.value)


def test_find_checkpoint_in_the_hf_cache_at_the_pinned_revision(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    write_hf_cache(cache, DISTILLED.repo_id, "0" * 40)  # an older snapshot, also present
    pinned = write_hf_cache(cache, DISTILLED.repo_id, DISTILLED.revision, ref=None)
    assert store.find_checkpoint(DISTILLED, tmp_path / "empty") == pinned


def test_find_checkpoint_falls_back_to_the_cached_main_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = write_hf_cache(tmp_path / "hf-home" / "hub", DISTILLED.repo_id, "f" * 40)
    assert store.find_checkpoint(DISTILLED, tmp_path / "empty") == snapshot
    with pytest.raises(store.WeightsNotFound):
        store.find_checkpoint(DISTILLED, tmp_path / "empty", hf_cache=False)


def test_find_checkpoint_prefers_the_weights_dir_over_the_cache(tmp_path: Path) -> None:
    write_hf_cache(tmp_path / "hf-cache", DISTILLED.repo_id, DISTILLED.revision)
    local = write_snapshot(tmp_path / "weights" / "flux2-klein-4b")
    assert store.find_checkpoint(DISTILLED, tmp_path / "weights") == local


def test_find_checkpoint_not_found_names_every_place_and_the_pull_command(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    with pytest.raises(store.WeightsNotFound) as caught:
        store.find_checkpoint("flux2-klein-4b", weights_dir)
    message = str(caught.value)
    assert str(weights_dir / "flux2-klein-4b") in message
    assert f"{weights_dir}: no model_index.json" in message
    assert str(tmp_path / "hf-cache" / "models--black-forest-labs--FLUX.2-klein-4B") in message
    assert f"stepimage weights pull flux2-klein-4b --weights-dir {weights_dir}" in message
    assert caught.value.command == f"stepimage weights pull flux2-klein-4b --weights-dir {weights_dir}"
    assert len(caught.value.searched) == 3
    assert isinstance(caught.value, FileNotFoundError)


def test_find_checkpoint_uses_the_default_weights_dir(tmp_path: Path) -> None:
    snapshot = write_snapshot(tmp_path / "default-weights" / "flux2-klein-4b")
    assert store.find_checkpoint(DISTILLED) == snapshot


def test_default_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.default_weights_dir() == tmp_path / "default-weights"
    monkeypatch.delenv(store.ENV_WEIGHTS_DIR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.default_weights_dir() == tmp_path / "home" / ".cache" / "stepimage" / "weights"
    assert store.checkpoint_dir(tmp_path, BASE) == tmp_path / "flux2-klein-base-4b"


# --- pull ---------------------------------------------------------------------------------------------------


def test_pull_downloads_the_pinned_revision_then_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(write_snapshot(Path(str(kwargs["local_dir"]))))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = store.pull(DISTILLED, tmp_path / "weights", token="hf_test", progress=False)
    assert path == tmp_path / "weights" / "flux2-klein-4b"
    (call,) = calls
    assert call["repo_id"] == DISTILLED.repo_id and call["revision"] == DISTILLED.revision
    assert call["allow_patterns"] == list(DISTILLED.allow_patterns) and call["token"] == "hf_test"
    # The pulled folder is what find_checkpoint then finds.
    assert store.find_checkpoint(DISTILLED, tmp_path / "weights") == path


def test_pull_that_leaves_an_incomplete_copy_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def partial_download(repo_id: str, **kwargs: object) -> str:
        root = write_snapshot(Path(str(kwargs["local_dir"])))
        (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial_download)
    with pytest.raises(store.VerificationFailed) as caught:
        store.pull(DISTILLED, tmp_path / "weights", progress=False)
    assert caught.value.report.missing[0].endswith("vae/diffusion_pytorch_model.safetensors")


def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub backs off for ~20 s before giving up on a refused connection; skip the waiting.
    http = pytest.importorskip("huggingface_hub.utils._http")
    if isinstance(getattr(http, "time", None), types.ModuleType):
        public = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
        fake_time = types.SimpleNamespace(**public)
        fake_time.sleep = lambda _seconds: None
        monkeypatch.setattr(http, "time", fake_time)


def test_pull_fails_clearly_when_the_hub_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _fast_retries(monkeypatch)
    weights_dir = tmp_path / "weights"

    with pytest.raises(store.PullFailed) as caught:
        store.pull(DISTILLED, weights_dir, progress=False)
    message = str(caught.value)
    assert message.startswith("could not reach the Hugging Face Hub at http://127.0.0.1:9")
    assert str(weights_dir / "flux2-klein-4b") in message and "stepimage weights verify" in message

    capsys.readouterr()
    assert cli.main(["pull", "--weights-dir", str(weights_dir), "--quiet"]) == 2
    assert "could not reach the Hugging Face Hub" in capsys.readouterr().err


def test_pull_reports_offline_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(store.PullFailed, match="HF_HUB_OFFLINE"):
        store.pull(DISTILLED, tmp_path / "weights", progress=False)


def test_pull_of_a_gated_repository_mentions_hf_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refused(repo_id: str, **kwargs: object) -> str:
        response = types.SimpleNamespace(status_code=403, headers={}, request=None)
        raise GatedRepoError("403 Client Error: access to this model is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(store.PullFailed, match="HF_TOKEN") as caught:
        store.pull(BASE, tmp_path / "weights", progress=False)
    assert "403" in str(caught.value)


def test_pull_does_not_hide_programming_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def broken(repo_id: str, **kwargs: object) -> str:
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(TypeError):
        store.pull(DISTILLED, tmp_path / "weights", progress=False)


# --- list_checkpoints and the CLI ---------------------------------------------------------------------------


def test_list_checkpoints_reports_present_incomplete_and_absent(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    write_snapshot(weights_dir / "flux2-klein-4b")
    rows = {row["name"]: row for row in store.list_checkpoints(weights_dir)}
    assert rows["flux2-klein-4b"]["status"] == "present"
    assert rows["flux2-klein-4b"]["default"] is True
    assert rows["flux2-klein-4b"]["path"] == str(weights_dir / "flux2-klein-4b")
    assert rows["flux2-klein-base-4b"]["status"] == "absent"
    assert rows["flux2-klein-base-4b"]["path"] == str(weights_dir / "flux2-klein-base-4b")
    fields = {"name", "repo_id", "revision", "default", "description", "size", "status", "path"}
    assert set(rows["flux2-klein-4b"]) >= fields

    (weights_dir / "flux2-klein-4b" / "transformer" / "config.json").unlink()
    assert store.list_checkpoints(weights_dir)[0]["status"] == "incomplete"


def test_cli_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights_dir = tmp_path / "weights"
    write_snapshot(weights_dir / "flux2-klein-base-4b", distilled=False)
    assert cli.main(["list", "--weights-dir", str(weights_dir)]) == 0
    out = capsys.readouterr().out
    assert "flux2-klein-4b *" in out and "absent" in out and "present" in out

    assert cli.main(["list", "--weights-dir", str(weights_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    statuses = [(row["name"], row["status"]) for row in rows]
    assert statuses == [("flux2-klein-4b", "absent"), ("flux2-klein-base-4b", "present")]


def test_cli_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights_dir = tmp_path / "weights"
    assert cli.main(["verify", "--weights-dir", str(weights_dir)]) == 1
    assert "stepimage weights pull flux2-klein-4b --weights-dir" in capsys.readouterr().err

    root = write_snapshot(weights_dir / "flux2-klein-4b")
    assert cli.main(["verify", "flux2-klein-4b", "--weights-dir", str(weights_dir)]) == 0
    assert "flux2-klein-4b: complete" in capsys.readouterr().out

    (root / "text_encoder" / TEXT_SHARDS[0]).unlink()
    assert cli.main(["verify", "--weights-dir", str(weights_dir)]) == 1
    out = capsys.readouterr().out
    assert "incomplete" in out and str(root / "text_encoder" / TEXT_SHARDS[0]) in out


def test_cli_rejects_an_unknown_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["verify", "flux2-klein-9b"])
    assert caught.value.code == 2
    assert "flux2-klein-4b" in capsys.readouterr().err


def test_add_weights_arguments_wires_into_a_parent_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="stepimage")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_weights_arguments(commands)
    args = parser.parse_args(["weights", "list", "--weights-dir", str(tmp_path), "--json"])
    assert args.func is cli.cmd_list
    assert args.func(args) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(CHECKPOINTS)
    assert parser.parse_args(["weights", "pull"]).name == DEFAULT_CHECKPOINT


def test_public_names_are_exported() -> None:
    for name in weights.__all__:
        assert hasattr(weights, name), name
