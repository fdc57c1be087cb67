"""Where the text encoder lives between prompts: `--text-encoder-placement device|offload|cpu`.

The Qwen3-4B text encoder is as large as the transformer (4.02 billion parameters, 8.0 GB in bf16; 3.22
billion, 6.4 GB, trimmed) but runs once per new prompt, and the prompt cache makes repeated prompts free.
So on a card too small for both:

- `device` (default): resident on the serving device with everything else.
- `offload`: kept in CPU memory (pinned, so copies run at full PCIe speed) and copied to the serving
  device only to encode prompts that are not in the cache; the device copy is dropped as soon as the
  transformer starts denoising. Embeddings are bit-identical to `device` (the same weights run on the
  same device); a new prompt pays one host-to-device copy of the weights.
- `cpu`: stays on the CPU and encodes there; the embeddings are copied to the serving device. It never
  takes device memory, at the price of running a 4B model on the CPU for each new prompt.

The weights never change, so dropping the device copy needs no copy back: the CPU copy stays the
master and moving in is the only transfer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

TEXT_ENCODER_PLACEMENTS = ("device", "offload", "cpu")


class TextEncoderPlacement:
    """Keeps the text encoder where `placement` says and moves it in for encoding when it must."""

    def __init__(self, text_encoder: torch.nn.Module, placement: str, device: str) -> None:
        if placement not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(
                f"text encoder placement must be one of {', '.join(TEXT_ENCODER_PLACEMENTS)}, got {placement!r}"
            )
        self.text_encoder = text_encoder
        self.placement = placement
        self.device = torch.device(device)
        self.resident = placement == "device"
        # How often the weights were copied in, and the time those copies took (for benchmarks and tests).
        self.moves_in = 0
        self.move_in_ms = 0.0
        self._host: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
        if placement == "cpu":
            text_encoder.to("cpu")
        elif placement == "offload":
            self._keep_host_copies()

    @property
    def encode_device(self) -> torch.device:
        """Where the text encoder computes: the CPU for `cpu`, else the serving device."""
        return torch.device("cpu") if self.placement == "cpu" else self.device

    def _keep_host_copies(self) -> None:
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        for module in self.text_encoder.modules():
            for is_parameter, tensors in ((True, module._parameters), (False, module._buffers)):
                for name, tensor in tensors.items():
                    if tensor is None:
                        continue
                    host = tensor.detach().to("cpu")
                    if pin:
                        host = host.pin_memory()
                    self._host.append((module, name, is_parameter, host))
                    self._point_at(module, name, is_parameter, host)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _point_at(module: torch.nn.Module, name: str, is_parameter: bool, tensor: torch.Tensor) -> None:
        # Swapping `.data` keeps every Parameter object (and whatever refers to it) as it is.
        if is_parameter:
            module._parameters[name].data = tensor
        else:
            module._buffers[name] = tensor

    @contextlib.contextmanager
    def encoding(self) -> Iterator[torch.device]:
        """Around a text-encoder call: for `offload`, copies the weights in if they are not there yet.

        They stay until `release()` (the transformer's first step), so the prompts of one batch, and a
        negative prompt, share one copy.
        """
        if self.placement == "offload" and not self.resident:
            started = time.perf_counter()
            for module, name, is_parameter, host in self._host:
                self._point_at(module, name, is_parameter, host.to(self.device, non_blocking=True, copy=True))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.resident = True
            self.moves_in += 1
            self.move_in_ms += (time.perf_counter() - started) * 1000
        yield self.encode_device

    def release(self) -> None:
        """For `offload`: drop the device copy (the CPU copy is the master); a no-op otherwise."""
        if self.placement != "offload" or not self.resident:
            return
        for module, name, is_parameter, host in self._host:
            self._point_at(module, name, is_parameter, host)
        self.resident = False

    def release_before(self, model: torch.nn.Module) -> None:
        """Release whenever `model` (the transformer) runs, so denoising never shares memory with it."""
        if self.placement == "offload":
            model.register_forward_pre_hook(lambda *_: self.release())
