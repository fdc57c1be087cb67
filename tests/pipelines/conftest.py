"""Fixtures for the pipeline tier: the real `Flux2KleinPipeline` built tiny, on CPU, and spies on it.

The spies hook the pipeline's own modules (transformer, text encoder), so the tests see what the
diffusers code actually ran, not what our backend says it asked for.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipelines.base import GenerationRequest
from pipelines.flux2_klein import Flux2KleinBackend, RunOptions
from pipelines.tiny import load_tiny_backend, save_tiny_pipeline

# What `_get_qwen3_prompt_embeds` wraps every prompt in (the tiny tokenizer's chat template); the spy
# strips it to recover the prompt text the text encoder was really given.
_CHAT_TURN = re.compile(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n", re.DOTALL)


class PipelineSpy:
    """Counts transformer passes and records the prompts the text encoder receives, via module hooks."""

    def __init__(self, backend: Flux2KleinBackend) -> None:
        self.backend = backend
        # Sequence length (image tokens + reference-image tokens) of each transformer pass, in order.
        self.pass_tokens: list[int] = []
        # Prompts decoded from the text encoder's input_ids, one per encoded row.
        self.encoded: list[str] = []
        # Called after each transformer pass with the number of passes so far (used to cancel mid-run).
        self.after_pass: Callable[[int], None] | None = None
        pipe = backend.pipe
        self._handles = [
            pipe.transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True),
            pipe.transformer.register_forward_hook(self._after_transformer),
            pipe.text_encoder.register_forward_pre_hook(self._before_text_encoder, with_kwargs=True),
        ]

    @property
    def passes(self) -> int:
        return len(self.pass_tokens)

    def reset(self) -> None:
        self.pass_tokens.clear()
        self.encoded.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before_transformer(self, module: Any, args: tuple, kwargs: dict) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.pass_tokens.append(int(hidden_states.shape[1]))

    def _after_transformer(self, module: Any, args: tuple, output: Any) -> None:
        if self.after_pass is not None:
            self.after_pass(self.passes)

    def _before_text_encoder(self, module: Any, args: tuple, kwargs: dict) -> None:
        tokenizer = self.backend.pipe.tokenizer
        input_ids = kwargs["input_ids"]
        mask = kwargs["attention_mask"].bool()
        for ids, keep in zip(input_ids, mask):
            text = tokenizer.decode(ids[keep], skip_special_tokens=False)
            match = _CHAT_TURN.fullmatch(text)
            # Keep the raw text when the template is not recognised, so a test failure shows what arrived.
            self.encoded.append(match.group(1) if match else text)


@pytest.fixture(scope="session")
def klein_backend() -> Flux2KleinBackend:
    """The tiny backend, loaded once through the production loader.

    Separate from the top-level `tiny_backend` fixture on purpose: these tests hook and reset this
    instance, and must not disturb the copy that the API tests share.
    """
    return load_tiny_backend(RunOptions())


@pytest.fixture
def spy(klein_backend: Flux2KleinBackend):
    """Hooks on the session backend, removed afterwards; the prompt cache starts empty so encodes are seen."""
    klein_backend._prompt_cache.clear()
    watcher = PipelineSpy(klein_backend)
    try:
        yield watcher
    finally:
        watcher.close()
        klein_backend._prompt_cache.clear()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved once in diffusers layout; tests that damage it work on a copy."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("checkpoint") / "flux2-klein-tiny")


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "flux2-klein-tiny"))


@pytest.fixture
def small() -> Callable[..., GenerationRequest]:
    """Build a cheap request: 64x64, 2 steps, seed 7, unless overridden."""

    def build(prompt: str, **fields: Any) -> GenerationRequest:
        values: dict[str, Any] = dict(seed=7, steps=2, height=64, width=64)
        values.update(fields)
        return GenerationRequest(prompt=prompt, **values)

    return build
