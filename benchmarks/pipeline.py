"""Pipeline benchmark: per-stage timings of the FLUX.2 [klein] backend, in-process, no HTTP.

For text-to-image at each requested size and for an edit, it times prompt encoding, every denoising
step, the VAE decode and the image encoding (PNG/JPEG/WebP), for each variant (eager or compiled, one
dtype each), and puts the compute floor beside them: the transformer's FLOPs per step (counted from the
model's own config on the meta device) divided by the device's peak rate, so each figure reads as a
fraction of the physical limit. `--baseline` adds plain `Flux2KleinPipeline.__call__` on the same
weights, as a server that calls diffusers directly would, for a side-by-side speed-up.

    # a GPU, full-size 4B architecture with random weights
    python -m benchmarks pipeline --random-weights --variants eager:bf16,compiled:bf16,compiled:fp16 --baseline \\
        --out benchmarks/results/pipeline-h200.json
    # this CPU, the tiny model (checks the tool, not the model's speed)
    python -m benchmarks pipeline --tiny --variants eager:fp32 --out benchmarks/results/pipeline-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.assets import test_image
from benchmarks.stats import machine, write_report
from pipelines.base import GenerationRequest
from pipelines.flux2_klein import RunOptions, load_checkpoint_backend, load_random_weights_backend
from pipelines.scheduling import image_tokens
from pipelines.tiny import load_tiny_backend
from server.images import encode_image

# Dense bf16 matrix rates (TFLOP/s) for the compute floor. H100/H200: the rate measured for a large bf16
# matrix product on an H200 (the datasheet says 989; nothing reaches it); others: vendor datasheets.
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def transformer_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer pass, counted by running the model on the meta device (no memory, no time)."""
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
    return float(counter.get_total_flops())


def build_backend(args: argparse.Namespace, compiled: bool, dtype: str):
    options = RunOptions(
        device=args.device,
        dtype=dtype,
        compile=compiled,
        attention_backend=args.attention_backend,
        trim_text_encoder=args.trim_text_encoder,
        prompt_cache_size=0,  # every run encodes its prompt: the stage is measured, not cached away
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


def measure(backend, request: GenerationRequest, repeats: int, flops_per_pass: float, peak: float | None) -> dict:
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
        "transformer_gflop_per_step": round(flops_per_pass * passes / 1e9, 3),
    }
    if peak:
        floor_ms = flops_per_pass * passes / (peak * 1e12) * 1000
        report["floor_step_ms"] = round(floor_ms, 2)
        report["step_fraction_of_floor"] = round(floor_ms / steady, 3) if steady else None
    if device.type == "cuda":
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
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
    totals = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        pipe(prompt=f"{request.prompt} #{index}", generator=torch.Generator("cpu").manual_seed(index), **kwargs)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)
        if index:  # the first call is its warm-up
            totals.append((time.perf_counter() - started) * 1000)
    return {"median_total_ms": round(statistics.median(totals), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    heights_widths = [tuple(int(side) for side in size.split("x")) for size in args.sizes.split(",")]
    edit_w, edit_h = (int(side) for side in args.edit_input.split("x"))
    edit_source = test_image(edit_w, edit_h)
    report: dict[str, Any] = {"tool": "pipeline", "machine": machine(), "settings": vars(args).copy(), "variants": []}
    peak = peak_tflops(args.device, args.peak_tflops)
    report["peak_tflops"] = peak
    for variant in args.variants.split(","):
        mode, _, dtype = variant.partition(":")
        compiled = mode == "compiled"
        started = time.perf_counter()
        backend = build_backend(args, compiled, dtype or "bf16")
        load_s = time.perf_counter() - started
        config = dict(backend.pipe.transformer.config)
        text_tokens = backend.spec.max_sequence_length
        started = time.perf_counter()
        backend.warm_up(heights_widths)
        entry: dict[str, Any] = {
            "variant": variant,
            "load_s": round(load_s, 1),
            "warm_up_s": round(time.perf_counter() - started, 1),
            "text_to_image": {},
        }
        for height, width in heights_widths:
            request = GenerationRequest(prompt="a lake at dawn", seed=1, steps=args.steps, height=height, width=width)
            tokens = image_tokens(height, width)
            flops = transformer_flops(config, tokens, text_tokens)
            entry["text_to_image"][f"{height}x{width}"] = measure(backend, request, args.repeats, flops, peak)
        edit = GenerationRequest(prompt="make the sky red", seed=1, steps=args.steps, image=edit_source)
        work_w, work_h = backend.batch_key(edit)[1][0]  # the edited image's working size
        tokens = 2 * image_tokens(work_h, work_w)  # the generated image plus the reference image
        entry["edit"] = measure(backend, edit, args.repeats, transformer_flops(config, tokens, text_tokens), peak)
        if args.baseline and not compiled and "baseline_plain_diffusers" not in report:
            # Plain diffusers is measured on an eager pipeline: what a server calling it directly gets.
            first = heights_widths[0]
            plain = GenerationRequest(prompt="a lake", seed=1, steps=args.steps, height=first[0], width=first[1])
            report["baseline_plain_diffusers"] = {
                "variant": variant,
                "size": f"{first[0]}x{first[1]}",
                "text_to_image": measure_baseline(backend, plain, args.repeats),
                "edit": measure_baseline(backend, edit, args.repeats),
            }
        report["variants"].append(entry)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench pipeline", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tiny random model")
    source.add_argument("--random-weights", action="store_true", help="full-size architecture, random weights")
    source.add_argument("--weights", help="a checkpoint directory in diffusers layout")
    parser.add_argument("--checkpoint", default="flux2-klein-4b")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants", default="eager:bf16,compiled:bf16", help="comma-separated MODE:DTYPE, MODE eager|compiled"
    )
    parser.add_argument("--attention-backend")
    parser.add_argument("--trim-text-encoder", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="1024x1024", help="text-to-image HEIGHTxWIDTH list, e.g. 1024x1024,768x1360")
    parser.add_argument("--edit-input", default="1024x1024", help="WIDTHxHEIGHT of the edit's input image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", action="store_true", help="also time plain diffusers on the same weights")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the compute floor (default: known GPUs)")
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    write_report(report, args.out)
    for entry in report["variants"]:
        for name, numbers in [*entry["text_to_image"].items(), ("edit", entry["edit"])]:
            median = numbers["median_ms"]
            floor = numbers.get("floor_step_ms")
            sys.stdout.write(
                f"{entry['variant']:>14} {name:>10}: total {median['total']} ms (encode {median['encode_prompt']}, "
                f"denoise {median['denoise']}, decode {median['decode']}), step {numbers['steady_step_ms']} ms"
                + (f", floor {floor} ms" if floor else "")
                + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
