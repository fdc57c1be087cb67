"""The FLUX.2 [klein] backend built tiny, with random weights, entirely offline.

The real `Flux2KleinPipeline` class with a 1+1-block transformer, a 3-layer Qwen3 text encoder, a
4-level VAE (the real 8x spatial factor, so 1024x1024 is 4096 image tokens as on the real model) and
a locally built tokenizer. The pipeline is saved to a diffusers-layout directory and loaded back
through the same loader that loads real weights, so every server start with `--backend tiny`
exercises the production loading path. Its images are noise; it exists so that the server, every
field and every error can be run and tested with no GPU and no download.

Weights are drawn from a fixed seed, so the same tiny model (and the same pixels for a given
request and seed) comes back on every machine.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pipelines.base import BackendInfo
from pipelines.flux2_klein import (
    Flux2KleinBackend,
    ModelSpec,
    RunOptions,
    build_pipeline_from_configs,
    load_pipeline,
)

logger = logging.getLogger(__name__)

TINY_SPEC = ModelSpec(name="flux2-klein-tiny", text_encoder_out_layers=(1, 2, 3), max_sequence_length=512)

# Qwen3 text encoder: 3 layers of width 16; the pipeline stacks layers 1..3 into a 48-wide embedding.
TEXT_ENCODER_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x 2x2 packing
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # 3 text-encoder layers x 16
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)
# Four levels give the real 8x spatial factor; 4 channels keep a 1024x1024 decode near 0.2 s on 2 cores
# (8 channels cost 0.43 s, measured while choosing).
VAE_CONFIG = dict(
    block_out_channels=(4, 4, 4, 4),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=2,
    mid_block_add_attention=False,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)
WEIGHTS_SEED = 0


def build_tiny_pipeline():
    """The tiny pipeline in memory, with weights drawn from a fixed seed."""
    return build_pipeline_from_configs(
        transformer=TRANSFORMER_CONFIG,
        text_encoder=TEXT_ENCODER_CONFIG,
        vae=VAE_CONFIG,
        scheduler=SCHEDULER_CONFIG,
        is_distilled=True,
        seed=WEIGHTS_SEED,
    )


def save_tiny_pipeline(path: Path) -> Path:
    """Write the tiny pipeline to `path` in diffusers layout, as a real checkpoint would be."""
    path = Path(path)
    build_tiny_pipeline().save_pretrained(str(path))
    return path


def load_tiny_backend(options: RunOptions, workdir: Path | None = None) -> Flux2KleinBackend:
    """Build, save and load back the tiny pipeline through the production loader."""
    from pipelines.flux2_klein import resolve_dtype

    with tempfile.TemporaryDirectory(prefix="stepimage-tiny-", dir=workdir) as tmp:
        path = save_tiny_pipeline(Path(tmp) / "flux2-klein-tiny")
        pipe, _ = load_pipeline(path, dtype=resolve_dtype(options.dtype), device=options.device)
    info = BackendInfo(
        backend="tiny",
        model=TINY_SPEC.name,
        device=options.device,
        dtype=options.dtype,
        random_weights=True,
        notes=("tiny random-weight model: images are noise; for tests and demos only",),
    )
    logger.warning("backend 'tiny': a tiny FLUX.2 [klein] with random weights is serving; its images are noise")
    return Flux2KleinBackend(pipe, TINY_SPEC, options, info)
