"""What the compute floor divides by: the GPU's matrix rate, from its datasheet and as measured on it.

Datasheet figures are dense (no 2:4 sparsity) tensor-core rates in TFLOP/s from the vendors' published
specifications, for the SXM/board variant that `torch.cuda.get_device_name` names. No real workload
reaches them: a large bf16 matrix product through PyTorch measured 769-798 TFLOP/s on an H200 and about
798 on an H100 (8192x8192x8192, random data), against 989 on the datasheet. So the floor uses the rate
measured on the GPU that runs the benchmark (`measure_matmul_tflops`), and reports the datasheet's
beside it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

# Dense tensor-core TFLOP/s by datasheet, (bf16, fp8); fp8 is None where the chip has no fp8 units.
# Matched by substring in this order, so the more specific names come first.
DATASHEET_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 1979.0),  # H200 SXM ("NVIDIA H200")
    ("B200", 2250.0, 4500.0),
    ("L40S", 362.0, 733.0),
    ("L4", 121.0, 242.0),
    ("A100", 312.0, None),
    ("A10", 125.0, None),
)

# The bf16 rate the README's paper floor uses: measured, not the datasheet (see the module docstring).
REFERENCE_MEASURED_BF16 = {"gpu": "NVIDIA H200", "tflops": 790.0, "how": "8192^3 bf16 torch.matmul, random data"}


def datasheet_tflops(name: str) -> dict[str, float | None] | None:
    for key, bf16, fp8 in DATASHEET_TFLOPS:
        if key in name:
            return {"bf16": bf16, "fp8": fp8}
    return None


def _rate(flops: int, milliseconds: float) -> float:
    """TFLOP/s to four significant figures (a CPU's fraction of one TFLOP/s must not round to zero)."""
    return float(f"{flops / (milliseconds / 1000) / 1e12:.4g}")


def _time_ms(function, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `function()` after a warm-up, timed with CUDA events (host clock on CPU)."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            function()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def measure_matmul_tflops(device: str, size: int = 8192, repeats: int = 20) -> dict[str, Any]:
    """The matrix rate measured here: bf16 (fp32 on CPU) and, on fp8-capable GPUs, float8 with per-row scales.

    Random inputs (zeros run faster than real data), several input sets rotated so repeated products
    do not hit the cache, the median of `repeats` event-timed products.
    """
    target = torch.device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    generator = torch.Generator(target).manual_seed(0)
    sets = [
        (
            torch.randn(size, size, device=target, dtype=dtype, generator=generator),
            torch.randn(size, size, device=target, dtype=dtype, generator=generator),
        )
        for _ in range(3)
    ]
    turn = iter(range(1 << 30))

    def bf16_product():
        a, b = sets[next(turn) % len(sets)]
        return a @ b

    flops = 2 * size**3
    result: dict[str, Any] = {
        "size": size,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "tflops": _rate(flops, _time_ms(bf16_product, target, repeats)),
    }
    if target.type == "cuda" and torch.cuda.get_device_capability(target) >= (8, 9):
        result["fp8_rowwise_tflops"] = _fp8_rate(sets, target, repeats, flops)
    sets.clear()  # frees the inputs before the caller's next allocation
    if target.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _fp8_rate(sets, target: torch.device, repeats: int, flops: int) -> float | None:
    """float8 e4m3 x e4m3 -> bf16 with per-row scales: the product torchao's fp8 recipe runs."""
    try:
        quantized = []
        for a, b in sets:
            a_scale = a.abs().amax(dim=1, keepdim=True).float() / 448.0
            b_scale = b.abs().amax(dim=0, keepdim=True).float() / 448.0
            a8 = (a / a_scale).to(torch.float8_e4m3fn)
            # _scaled_mm wants the second operand column-major.
            b8 = (b / b_scale).to(torch.float8_e4m3fn).t().contiguous().t()
            quantized.append((a8, b8, a_scale, b_scale))
        turn = iter(range(1 << 30))

        def product():
            a8, b8, a_scale, b_scale = quantized[next(turn) % len(quantized)]
            return torch._scaled_mm(a8, b8, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16)

        return _rate(flops, _time_ms(product, target, repeats))
    except (RuntimeError, TypeError) as exc:  # an older torch or cuBLAS without row-wise scaling
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}  # type: ignore[return-value]


def describe_gpu(device: str) -> dict[str, Any]:
    """Name, capability, memory and the datasheet rates of `device` (just the torch build on CPU)."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    target = torch.device(device)
    if target.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(target)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 1e9, 1),
            multiprocessors=props.multi_processor_count,
            datasheet_tflops=datasheet_tflops(props.name),
        )
    else:
        info["name"] = "cpu"
    return info
