"""Pipeline benchmark: per-stage timings of the FLUX.2 [klein] backend, in-process, no HTTP.

For text-to-image at each requested size and for an edit, it times prompt encoding, every denoising
step, the VAE decode and the image encoding (PNG/JPEG/WebP), for each variant, and puts the compute
floor beside them: the transformer's FLOPs per step (counted from the model's own config on the meta
device) divided by the matrix rate measured on the device at the start of the run (the datasheet rate
is reported beside it: benchmarks.hardware), so each figure reads as a fraction of the physical limit.
`--baseline` adds plain `Flux2KleinPipeline.__call__` on the same weights, as a server that calls
diffusers directly would, for a side-by-side speed-up.

A variant is MODE:DTYPE[+OPTION...]: MODE eager|compiled; OPTION fp8 (--quantize fp8), trim
(--trim-text-encoder), offload or te-cpu (--text-encoder-placement offload|cpu). A variant with fp8 is
compared with the same variant without it on the same seeds: the PSNR of the decoded images and the
relative error of the final latents (`drift`).

    # a GPU, full-size 4B architecture with random weights
    python -m benchmarks pipeline --random-weights --variants eager:bf16,compiled:bf16,compiled:bf16+fp8 \\
        --baseline --out benchmarks/results/pipeline-h100.json
    # this CPU, the tiny model (checks the tool, not the model's speed)
    python -m benchmarks pipeline --tiny --variants eager:fp32 --out benchmarks/results/pipeline-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.assets import test_image
from benchmarks.hardware import REFERENCE_MEASURED_BF16, describe_gpu, measure_matmul_tflops
from benchmarks.stats import machine, write_report
from pipelines.base import GenerationRequest
from pipelines.flux2_klein import RunOptions, load_checkpoint_backend, load_random_weights_backend
from pipelines.scheduling import image_tokens
from pipelines.tiny import load_tiny_backend
from server.images import encode_image

VARIANT_OPTIONS = {"fp8", "trim", "offload", "te-cpu"}


@dataclass(frozen=True)
class Variant:
    """One configuration of the backend, parsed from MODE:DTYPE[+OPTION...]."""

    name: str
    compiled: bool
    dtype: str
    quantize: str = "none"
    trim_text_encoder: bool = False
    text_encoder_placement: str = "device"

    @property
    def without_fp8(self) -> str:
        """The name of the same variant in the unquantized dtype: the reference its drift is measured against."""
        return self.name.replace("+fp8", "")


def parse_variant(text: str) -> Variant:
    head, *options = text.strip().split("+")
    mode, _, dtype = head.partition(":")
    if mode not in ("eager", "compiled"):
        raise ValueError(f"variant {text!r}: MODE must be eager or compiled")
    unknown = set(options) - VARIANT_OPTIONS
    if unknown or ("offload" in options and "te-cpu" in options):
        raise ValueError(f"variant {text!r}: options are {', '.join(sorted(VARIANT_OPTIONS))} (offload or te-cpu)")
    placement = "offload" if "offload" in options else "cpu" if "te-cpu" in options else "device"
    return Variant(
        name=text.strip(),
        compiled=mode == "compiled",
        dtype=dtype or "bf16",
        quantize="fp8" if "fp8" in options else "none",
        trim_text_encoder="trim" in options,
        text_encoder_placement=placement,
    )


def parse_hw(text: str) -> tuple[int, int]:
    """'HEIGHTxWIDTH' -> (height, width), the order every size in this project uses."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 1024x1024") from None
    return height, width


def matmul_rates(device: str, override: float | None, size: int) -> dict[str, Any]:
    """The rates the floor divides by: `--peak-tflops` if given, else measured here now."""
    if override:
        return {"bf16_tflops": override, "basis": "given with --peak-tflops"}
    measured = measure_matmul_tflops(device, size=size)
    rates: dict[str, Any] = {"basis": f"measured here: {size}^3 {measured['dtype']} matmul", "measured": measured}
    rates["bf16_tflops"] = measured["tflops"]
    if isinstance(measured.get("fp8_rowwise_tflops"), float):
        rates["fp8_tflops"] = measured["fp8_rowwise_tflops"]
    return rates


def transformer_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer pass, counted by running the model on the meta device (no memory, no time)."""
    return transformer_flops_by_kind(config, image_tokens, text_tokens)["total"]


# The products that --quantize fp8 moves to float8: the linear layers. Everything else counted (attention's
# two batched products) stays in bf16.
LINEAR_OPS = ("mm", "addmm", "linear")


def transformer_flops_by_kind(config: dict, image_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one transformer pass: in the linear layers, elsewhere (attention), and in total."""
    from diffusers import Flux2Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
        hidden = torch.empty(1, image_tokens, config["in_channels"])
        text = torch.empty(1, text_tokens, config["joint_attention_dim"])
        timestep = torch.ones(1)
        image_ids = torch.zeros(1, image_tokens, 4, dtype=torch.long)
        text_ids = torch.zeros(1, text_tokens, 4, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )
    total = float(counter.get_total_flops())
    by_op = counter.get_flop_counts().get("Global", {})
    linear = float(sum(flops for op, flops in by_op.items() if str(op).split(".")[1] in LINEAR_OPS))
    return {"total": total, "linear": linear, "other": total - linear}


def build_backend(args: argparse.Namespace, variant: Variant, prompt_cache_size: int = 0):
    options = RunOptions(
        device=args.device,
        dtype=variant.dtype,
        compile=variant.compiled,
        attention_backend=args.attention_backend,
        trim_text_encoder=variant.trim_text_encoder or args.trim_text_encoder,
        quantize=variant.quantize,
        text_encoder_placement=variant.text_encoder_placement,
        # 0: every run encodes its prompt, so the stage is measured, not cached away.
        prompt_cache_size=prompt_cache_size,
        step_timing=True,
    )
    if args.tiny:
        return load_tiny_backend(options)
    if args.random_weights:
        from weights.manifest import get_checkpoint

        return load_random_weights_backend(get_checkpoint(args.checkpoint), options)
    return load_checkpoint_backend(Path(args.weights), args.checkpoint, options)


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(row[key] for row in rows), 2) for key in rows[0]}


def floor_ms(flops: dict[str, float], passes: int, rates: dict[str, Any], quantize: str) -> float | None:
    """The step's compute floor: linear FLOPs at the fp8 rate when quantized, the rest at the bf16 rate."""
    bf16 = rates.get("bf16_tflops")
    if not bf16:
        return None
    linear_rate = rates.get("fp8_tflops") if quantize == "fp8" else bf16
    if not linear_rate:
        return None
    seconds = flops["linear"] / (linear_rate * 1e12) + flops["other"] / (bf16 * 1e12)
    return seconds * passes * 1000


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GB since the last reset (reserved is what the card must hold)."""
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / 1e9, 2),
    }


class LatentTap:
    """Keeps the final latents of every decode (a copy on the CPU) for drift measurements."""

    def __init__(self, backend) -> None:
        self.latents: list[torch.Tensor] = []
        self._decode = backend.decode_batch

        def decode_batch(latents):
            self.latents.append(latents.detach().float().cpu())
            return self._decode(latents)

        backend.decode_batch = decode_batch


def measure(
    backend,
    request: GenerationRequest,
    repeats: int,
    flops: dict[str, float],
    rates: dict[str, Any],
    quantize: str = "none",
) -> dict:
    device = torch.device(backend.options.device)
    rows, steps = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(repeats):
        started = time.perf_counter()
        result = backend.generate(replace(request, prompt=f"{request.prompt} #{index}"))
        total = (time.perf_counter() - started) * 1000
        picture = result.images[0]
        encodes = {}
        for fmt in ("png", "jpeg", "webp"):
            began = time.perf_counter()
            encode_image(picture, fmt, None if fmt == "png" else 90)
            encodes[f"encode_{fmt}"] = (time.perf_counter() - began) * 1000
        rows.append({**result.timings_ms, **encodes, "total": total})
        steps.append(result.details.get("step_ms", []))
    passes = result.details["transformer_passes_per_step"]
    step_medians = [round(statistics.median(step[i] for step in steps), 2) for i in range(len(steps[0]))]
    # Step 0 also encodes the reference image for edits; the steady state is the later steps.
    steady = statistics.median(step_medians[1:]) if len(step_medians) > 1 else step_medians[0]
    report = {
        "median_ms": _median(rows),
        "step_ms": step_medians,
        "steady_step_ms": round(steady, 2),
        "working_size": list(result.details["working_size"]),
        "transformer_gflop_per_step": round(flops["total"] * passes / 1e9, 3),
    }
    floor = floor_ms(flops, passes, rates, quantize)
    if floor:
        report["floor_step_ms"] = round(floor, 3)
        report["step_fraction_of_floor"] = round(floor / steady, 3) if steady else None
    report.update(gpu_memory(device))
    return report


def measure_baseline(backend, request: GenerationRequest, repeats: int) -> dict:
    """Plain diffusers on the same weights: its own schedule, no prompt cache, no compile, PIL output."""
    pipe = backend.pipe
    kwargs = {
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": 1.0,
        "max_sequence_length": backend.spec.max_sequence_length,
        "text_encoder_out_layers": backend.spec.text_encoder_out_layers,
    }
    if request.image is not None:
        kwargs["image"] = request.image
        del kwargs["height"], kwargs["width"]
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    totals = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        pipe(prompt=f"{request.prompt} #{index}", generator=torch.Generator("cpu").manual_seed(index), **kwargs)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)
        if index:  # the first call is its warm-up
            totals.append((time.perf_counter() - started) * 1000)
    return {"median_total_ms": round(statistics.median(totals), 2), **gpu_memory(backend.device)}


# Drift cases: (prompt, seed); the same for every variant, so fp8 and bf16 see identical inputs.
DRIFT_PROMPTS = ("a lighthouse on a cliff at dusk", "a bowl of lemons on a blue table", "a city street in rain")


def drift_samples(backend, height: int, width: int, edit_source, steps: int, count: int) -> dict[str, Any]:
    """Final latents and decoded pixels of `count` text-to-image cases and one edit, on fixed seeds."""
    tap = LatentTap(backend)
    samples: dict[str, Any] = {"latents": [], "pixels": []}
    cases = [
        GenerationRequest(prompt=DRIFT_PROMPTS[i % len(DRIFT_PROMPTS)], seed=100 + i, steps=steps,
                          height=height, width=width)
        for i in range(count)
    ]  # fmt: skip
    cases.append(GenerationRequest(prompt="make the sky red", seed=7, steps=steps, image=edit_source))
    for case in cases:
        result = backend.generate(case)
        samples["pixels"].append(np.asarray(result.images[0].convert("RGB"), dtype=np.float64))
    samples["latents"] = tap.latents
    return samples


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when identical)."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


def compare_samples(candidate: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """PSNR of the decoded images and relative L2 error of the latents, case by case, with the worst case."""
    psnrs = [round(psnr(a, b), 2) for a, b in zip(candidate["pixels"], reference["pixels"])]
    errors = [round(relative_error(a, b), 5) for a, b in zip(candidate["latents"], reference["latents"])]
    return {
        "cases": len(psnrs),
        "psnr_db": psnrs,
        "latent_relative_error": errors,
        "worst_psnr_db": min(psnrs),
        "worst_latent_relative_error": max(errors),
    }


def compile_counters() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    heights_widths = [parse_hw(size) for size in args.sizes.split(",")]
    edit_h, edit_w = parse_hw(args.edit_input)
    edit_source = test_image(edit_w, edit_h)
    variants = [parse_variant(text) for text in args.variants.split(",")]
    report: dict[str, Any] = {
        "tool": "pipeline",
        "machine": machine(),
        "gpu": describe_gpu(args.device),
        "settings": vars(args).copy(),
        "variants": [],
    }
    rates = matmul_rates(args.device, args.peak_tflops, args.matmul_size)
    report["matmul"] = rates
    report["reference_rate"] = REFERENCE_MEASURED_BF16
    report["peak_tflops"] = rates.get("bf16_tflops")
    drift_reference: dict[str, dict[str, Any]] = {}
    # None: the backend's own two 1 MP edits (what a server warms up with).
    warm_up_edits = ((edit_w, edit_h), (edit_h, edit_w)) if args.small_warm_up else None
    for variant in variants:
        torch._dynamo.reset()  # each variant compiles its own graphs, never reuses another's
        started = time.perf_counter()
        backend = build_backend(args, variant)
        load_s = time.perf_counter() - started
        config = dict(backend.pipe.transformer.config)
        text_tokens = backend.spec.max_sequence_length
        started = time.perf_counter()
        backend.warm_up(heights_widths, edit_sizes=warm_up_edits)
        entry: dict[str, Any] = {
            "variant": variant.name,
            "load_s": round(load_s, 1),
            "warm_up_s": round(time.perf_counter() - started, 1),
            "quantization": backend.quantization.summary(),
            "text_to_image": {},
        }
        graphs_before = compile_counters()
        for height, width in heights_widths:
            request = GenerationRequest(prompt="a lake at dawn", seed=1, steps=args.steps, height=height, width=width)
            flops = transformer_flops_by_kind(config, image_tokens(height, width), text_tokens)
            entry["text_to_image"][f"{height}x{width}"] = measure(
                backend, request, args.repeats, flops, rates, variant.quantize
            )
        edit = GenerationRequest(prompt="make the sky red", seed=1, steps=args.steps, image=edit_source)
        work_w, work_h = backend.batch_key(edit)[1][0]  # the edited image's working size
        tokens = 2 * image_tokens(work_h, work_w)  # the generated image plus the reference image
        flops = transformer_flops_by_kind(config, tokens, text_tokens)
        entry["edit"] = measure(backend, edit, args.repeats, flops, rates, variant.quantize)
        # Warm-up compiled everything: a graph compiled while measuring is a recompile a request would pay.
        entry["graphs_compiled_after_warm_up"] = compile_counters() - graphs_before
        if args.drift_cases:
            height, width = heights_widths[0]
            samples = drift_samples(backend, height, width, edit_source, args.steps, args.drift_cases)
            if variant.quantize == "none":
                drift_reference[variant.name] = samples
            elif variant.without_fp8 in drift_reference:
                entry["drift_vs"] = variant.without_fp8
                entry["drift"] = compare_samples(samples, drift_reference[variant.without_fp8])
        if args.baseline and not variant.compiled and "baseline_plain_diffusers" not in report:
            # Plain diffusers is measured on an eager pipeline: what a server calling it directly gets.
            first = heights_widths[0]
            plain = GenerationRequest(prompt="a lake", seed=1, steps=args.steps, height=first[0], width=first[1])
            report["baseline_plain_diffusers"] = {
                "variant": variant.name,
                "size": f"{first[0]}x{first[1]}",
                "text_to_image": measure_baseline(backend, plain, args.repeats),
                "edit": measure_baseline(backend, edit, args.repeats),
            }
        report["variants"].append(entry)
        # Written after every variant: a run stopped by a time limit keeps what it measured.
        write_report(report, args.out)
        del backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    baseline = report.get("baseline_plain_diffusers")
    if baseline:
        for entry in report["variants"]:
            ours_t2i = entry["text_to_image"][baseline["size"]]["median_ms"]["total"]
            ours_edit = entry["edit"]["median_ms"]["total"]
            entry["speedup_vs_plain_diffusers"] = {
                "text_to_image": round(baseline["text_to_image"]["median_total_ms"] / ours_t2i, 2),
                "edit": round(baseline["edit"]["median_total_ms"] / ours_edit, 2),
            }
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Median total per variant (and plain diffusers), text-to-image and edit side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, t2i, edits = [], [], []
    baseline = report.get("baseline_plain_diffusers")
    if baseline:
        labels.append("plain diffusers")
        t2i.append(baseline["text_to_image"]["median_total_ms"])
        edits.append(baseline["edit"]["median_total_ms"])
    for entry in report["variants"]:
        labels.append(entry["variant"])
        first = next(iter(entry["text_to_image"].values()))
        t2i.append(first["median_ms"]["total"])
        edits.append(entry["edit"]["median_ms"]["total"])
    xs = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    axis.bar(xs - 0.2, t2i, 0.4, label="text-to-image")
    axis.bar(xs + 0.2, edits, 0.4, label="edit")
    axis.set_xticks(xs, labels, rotation=20, fontsize=8)
    axis.set_ylabel("median total (ms)")
    gpu = report.get("gpu", {}).get("name", "")
    axis.set_title(f"{gpu} {report['settings']['steps']} steps", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench pipeline", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tiny random model")
    source.add_argument("--random-weights", action="store_true", help="full-size architecture, random weights")
    source.add_argument("--weights", help="a checkpoint directory in diffusers layout")
    parser.add_argument("--checkpoint", default="flux2-klein-4b")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants",
        default="eager:bf16,compiled:bf16",
        help="comma-separated MODE:DTYPE[+OPTION...]; MODE eager|compiled, OPTION fp8|trim|offload|te-cpu",
    )
    parser.add_argument("--attention-backend")
    parser.add_argument("--trim-text-encoder", action="store_true", help="trim in every variant")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="1024x1024", help="text-to-image HEIGHTxWIDTH list, e.g. 1024x1024,768x1360")
    parser.add_argument("--edit-input", default="1024x1024", help="HEIGHTxWIDTH of the edit's input image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--small-warm-up", action="store_true", help="warm edits up at --edit-input's size instead of 1 MP (dry runs)"
    )
    parser.add_argument("--baseline", action="store_true", help="also time plain diffusers on the same weights")
    parser.add_argument(
        "--drift-cases",
        type=int,
        default=0,
        help="text-to-image cases (plus one edit) on fixed seeds, compared between a +fp8 variant and the same "
        "variant without it",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="bf16 rate for the compute floor (default: measured on the device)"
    )
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the matmul that measures the rate")
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", help="PNG plot (default: next to --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_hw(args.edit_input)
        [parse_hw(size) for size in args.sizes.split(",")]
        [parse_variant(text) for text in args.variants.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    report = run(args)
    out = write_report(report, args.out)
    plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    for entry in report["variants"]:
        for name, numbers in [*entry["text_to_image"].items(), ("edit", entry["edit"])]:
            median = numbers["median_ms"]
            floor = numbers.get("floor_step_ms")
            sys.stdout.write(
                f"{entry['variant']:>22} {name:>10}: total {median['total']} ms (encode {median['encode_prompt']}, "
                f"denoise {median['denoise']}, decode {median['decode']}), step {numbers['steady_step_ms']} ms"
                + (f", floor {floor} ms" if floor else "")
                + (f", peak {numbers['peak_reserved_gb']} GB" if "peak_reserved_gb" in numbers else "")
                + "\n"
            )
        if "drift" in entry:
            drift = entry["drift"]
            sys.stdout.write(
                f"{entry['variant']:>22} drift vs {entry['drift_vs']}: worst PSNR {drift['worst_psnr_db']} dB, "
                f"worst latent relative error {drift['worst_latent_relative_error']}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
