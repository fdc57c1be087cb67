"""Weight quantization of the transformer: `--quantize fp8`, and when it is refused.

fp8 here is torchao's dynamic float8 recipe on the transformer's linear layers: weights stored as
float8 e4m3 with one scale per output row, activations quantized per row on the fly, and the matrix
products run as float8 x float8 on the GPU's fp8 tensor cores (`torch._scaled_mm`). Attention, norms
and everything outside the linear layers stay in bf16. It must be applied to the bf16 model before
torch.compile, so that the compiled graphs are traced over the float8 weights.

It needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell: the first with
fp8 tensor cores), bf16 weights (per-row scaling is defined for bf16 inputs) and torchao. Anything
else is refused before the model is built, with one line that says what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.base import ModelLoadError

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "fp8")
# The torchao release this code is tested with (pyproject's `fp8` extra pins the same): its float8
# API moved between releases (the config classes were renamed in 0.10 and reorganised since).
TORCHAO_VERSION = "0.18.0"
# torchao 0.18.0 declares torch 2.11 as its minimum (its compiled extensions are built against it).
MIN_TORCH_FOR_TORCHAO = (2, 11)
FP8_MIN_CAPABILITY = (8, 9)
# torchao leaves a linear layer in bf16 unless both of its sides are multiples of 16 (the fp8
# matrix-product kernels' alignment), so layers are counted with the same rule.
FP8_ALIGNMENT = 16


class QuantizationUnsupported(ModelLoadError):
    """The requested quantization cannot run on this device or install; the message says why in one line."""


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_transformer` changed, for the logs and the benchmark reports."""

    mode: str
    linear_layers: int
    quantized_layers: int
    weight_bytes_before: int
    weight_bytes_after: int

    def summary(self) -> str:
        return (
            f"{self.mode}: {self.quantized_layers} of {self.linear_layers} linear layers, transformer weights "
            f"{self.weight_bytes_before / 1e9:.2f} GB -> {self.weight_bytes_after / 1e9:.2f} GB"
        )


def _version_tuple(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def torchao_problem() -> str | None:
    """Why torchao cannot provide the fp8 recipe here, or None when it can."""
    hint = f"install the fp8 extra: pip install 'stepimage[fp8]' (torchao=={TORCHAO_VERSION})"
    try:
        import torchao
    except ImportError:
        return f"torchao is not installed; {hint}"
    except Exception as exc:  # a torchao built for another torch can fail at import in many ways
        return f"torchao does not import with torch {torch.__version__} ({type(exc).__name__}: {exc}); {hint}"
    version = getattr(torchao, "__version__", "unknown")
    if _version_tuple(torch.__version__)[:2] < MIN_TORCH_FOR_TORCHAO:
        minimum = ".".join(map(str, MIN_TORCH_FOR_TORCHAO))
        return f"torchao {version} needs torch >= {minimum}, found torch {torch.__version__}"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except ImportError as exc:
        return f"torchao {version} lacks the float8 dynamic per-row recipe ({exc}); {hint}"
    return None


def fp8_problem(device: str, dtype: str) -> str | None:
    """Why `--quantize fp8` cannot run on `device` with weights of `dtype`, or None when it can."""
    target = torch.device(device)
    if target.type != "cuda":
        return (
            f"--quantize fp8 needs an NVIDIA GPU of compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer; the device is {device}"
        )
    if not torch.cuda.is_available():
        return f"--quantize fp8 needs CUDA, which this torch ({torch.__version__}) cannot use"
    if torch.version.cuda is None:
        return "--quantize fp8 needs an NVIDIA GPU (this torch build is not a CUDA build)"
    capability = torch.cuda.get_device_capability(target)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(target)
        return (
            f"--quantize fp8 needs compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer "
            f"(Ada, Hopper); {name} is {capability[0]}.{capability[1]}: use --quantize none"
        )
    if dtype != "bf16":
        return f"--quantize fp8 needs bf16 weights (per-row float8 scaling is defined for bf16); got --dtype {dtype}"
    return torchao_problem()


def check_quantization(mode: str, device: str, dtype: str) -> None:
    """Raise QuantizationUnsupported (one line) unless `mode` can run here; call before building the model."""
    if mode not in QUANTIZE_MODES:
        raise QuantizationUnsupported(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "fp8":
        problem = fp8_problem(device, dtype)
        if problem:
            raise QuantizationUnsupported(problem)


def _fp8_eligible(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % FP8_ALIGNMENT == 0
        and module.out_features % FP8_ALIGNMENT == 0
    )


def _weight_bytes(model: torch.nn.Module) -> int:
    total = 0
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is None:
                continue
            # A float8 weight is a tensor subclass holding its data and its per-row scales.
            inner = [
                getattr(tensor, name)
                for name in ("qdata", "scale")
                if isinstance(getattr(tensor, name, None), torch.Tensor)
            ]
            for part in inner or [tensor]:
                total += part.numel() * part.element_size()
    return total


def fp8_config() -> Any:
    """torchao's float8 dynamic-activation, float8-weight config with per-row scales."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_transformer(transformer: torch.nn.Module, mode: str) -> QuantizationReport:
    """Quantize the transformer's linear layers in place (before any torch.compile) and say what changed.

    The caller has already passed `check_quantization` for the device the transformer is on.
    """
    linear = [module for module in transformer.modules() if isinstance(module, torch.nn.Linear)]
    before = _weight_bytes(transformer)
    if mode == "none":
        return QuantizationReport(mode, len(linear), 0, before, before)
    if mode != "fp8":
        raise QuantizationUnsupported(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    from torchao.quantization import quantize_

    eligible = sum(1 for module in linear if _fp8_eligible(module))
    quantize_(transformer, fp8_config(), filter_fn=lambda module, _name: _fp8_eligible(module))
    report = QuantizationReport(mode, len(linear), eligible, before, _weight_bytes(transformer))
    logger.info("quantized the transformer: %s", report.summary())
    return report
