"""The supported checkpoints: which Hub repository, which pinned commit, which files make a complete copy.

This module is data. It also owns reading the model configs bundled under ``weights/configs/``, so code that
builds the architecture without downloading anything (tiny tests, full-size random-weight benchmarks) and code
that checks a downloaded snapshot agree on one source of truth. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# The components with a bundled config; each maps to `configs/<config_name>/<component>.json`.
CONFIG_COMPONENTS = ("transformer", "text_encoder", "vae", "scheduler", "pipeline")

DEFAULT_CHECKPOINT = "flux2-klein-4b"


class UnknownCheckpoint(ValueError):
    """A checkpoint name that is not in the manifest."""


# The diffusers layout of both klein 4B repositories. The list is the published file list of
# black-forest-labs/FLUX.2-klein-4B at e7b7dc27f91deacad38e78976d1f2b499d76a294 (names, sizes and sha256 are
# recorded by several independent projects), minus LICENSE.md, which is fetched but not needed to load.
# Sharded components appear as their `*.safetensors.index.json`: `store.verify` reads the index and requires
# every shard it names, so the shard names and count are never hard-coded here.
_KLEIN_4B_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/added_tokens.json",
    "tokenizer/chat_template.jinja",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

# Both repositories also carry a 7.75 GB single-file checkpoint at the root (flux-2-klein-4b.safetensors,
# flux-2-klein-base-4b.safetensors) for ComfyUI-style loaders, plus README images. Diffusers never reads them,
# so the download names the component folders and skips the root, halving the transfer.
_KLEIN_4B_ALLOW = (
    "model_index.json",
    "LICENSE.md",
    "scheduler/*",
    "text_encoder/*",
    "tokenizer/*",
    "transformer/*",
    "vae/*",
)


@dataclass(frozen=True)
class Checkpoint:
    """One supported checkpoint: where it lives on the Hub and what a complete local copy holds."""

    name: str
    title: str
    repo_id: str
    # A commit sha, so two machines that pull on different days run the same weights.
    revision: str
    expected_files: tuple[str, ...]
    allow_patterns: tuple[str, ...]
    is_distilled: bool
    default_steps: int
    default_guidance_scale: float
    description: str
    license: str
    # Approximate bytes the pull transfers (the allow-listed files), for disk-space planning only.
    download_bytes: int
    # Which folder under configs/ describes the architecture; the base and distilled 4B models share it.
    config_name: str = "flux2-klein-4b"

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_CHECKPOINT

    @property
    def download_size(self) -> str:
        return format_bytes(self.download_bytes)

    def config(self, component: str) -> dict[str, Any]:
        """The bundled config of one component, as constructor kwargs.

        `pipeline` is shared by the base and distilled models, so its `is_distilled` is taken from this
        checkpoint rather than from the file.
        """
        data = load_bundled_config(component, self.config_name)
        if component == "pipeline":
            data["is_distilled"] = self.is_distilled
        return data


def load_bundled_config(component: str, config_name: str = "flux2-klein-4b") -> dict[str, Any]:
    """Read `configs/<config_name>/<component>.json`; a fresh dict each call, so callers may mutate it."""
    if component not in CONFIG_COMPONENTS:
        raise ValueError(f"unknown config component {component!r}; expected one of {', '.join(CONFIG_COMPONENTS)}")
    path = CONFIGS_DIR / config_name / f"{component}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled config at {path}")
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def format_bytes(count: int) -> str:
    """Decimal units, as the Hub and disk tools report sizes."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint(
        name="flux2-klein-4b",
        title="FLUX.2 [klein] 4B",
        repo_id="black-forest-labs/FLUX.2-klein-4B",
        # Pinned by many independent projects (diffusers and MLX ports, install manifests with per-file sha256).
        revision="e7b7dc27f91deacad38e78976d1f2b499d76a294",
        expected_files=_KLEIN_4B_FILES,
        allow_patterns=_KLEIN_4B_ALLOW,
        is_distilled=True,
        default_steps=4,
        default_guidance_scale=1.0,
        description="Step- and guidance-distilled 4B model: 4 steps, no CFG. The default, and the fast one.",
        license="Apache-2.0",
        # Sum of the published sizes of the allow-listed files at the pinned revision.
        download_bytes=15_980_141_329,
    ),
    Checkpoint(
        name="flux2-klein-base-4b",
        title="FLUX.2 [klein] base 4B",
        repo_id="black-forest-labs/FLUX.2-klein-base-4B",
        revision="a3b4f4849157f664bdbc776fd7453c2783562f4d",
        # Same diffusers export as the distilled repo (same components, same weight sizes in the published
        # metadata); the file list is assumed identical rather than checked name by name.
        expected_files=_KLEIN_4B_FILES,
        allow_patterns=_KLEIN_4B_ALLOW,
        is_distilled=False,
        default_steps=50,
        default_guidance_scale=4.0,
        description="Non-distilled 4B teacher: ~50 steps with real CFG and negative prompts; slower, more diverse.",
        license="Apache-2.0",
        # Approximate: the published component sizes match the distilled repo's.
        download_bytes=15_980_000_000,
    ),
)

_BY_NAME = {checkpoint.name: checkpoint for checkpoint in CHECKPOINTS}


def checkpoint_names() -> list[str]:
    return [checkpoint.name for checkpoint in CHECKPOINTS]


def get_checkpoint(name: str) -> Checkpoint:
    """The manifest entry called `name`; raises UnknownCheckpoint naming the valid choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownCheckpoint(f"unknown checkpoint {name!r}; valid names: {', '.join(checkpoint_names())}") from None
