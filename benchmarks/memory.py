"""GPU memory per serving mode: on paper from parameter counts, and measured for a 1 MP edit.

On paper (`--paper`, any machine): each component's parameters are counted on the meta device from the
checkpoint's bundled configs and multiplied by bytes per parameter (bf16: 2; fp8: 1 per linear-layer
weight plus a 4-byte scale per output row). That is the weights alone: activations, the CUDA context and
the allocator's slack come on top and are only known by measuring.

Measured (`--variants`, like the pipeline benchmark's MODE:DTYPE[+OPTION...]): for each variant, one
1 MP edit with a new prompt, the same prompt again (the prompt cache answers), and another new prompt,
with the peak memory PyTorch allocated and reserved, the device memory in use (CUDA context included),
and what encoding a new prompt costs (with `offload`, the copy of the text encoder's weights in).

    python -m benchmarks memory --paper --out benchmarks/results/memory-paper.json
    python -m benchmarks memory --random-weights --variants eager:bf16,eager:bf16+trim,eager:bf16+trim+offload \\
        --out memory-h100.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import torch

from benchmarks.assets import test_image
from benchmarks.hardware import describe_gpu
from benchmarks.pipeline import build_backend, gpu_memory, parse_hw, parse_variant
from benchmarks.stats import machine, write_report
from pipelines.base import GenerationRequest
from pipelines.quantize import FP8_ALIGNMENT

GB = 1e9
# Cards by memory size in GiB (what the vendors sell as 12/16/24/40/48/80/141 GB).
CARD_GIB = (12, 16, 24, 40, 48, 80, 141)
# The driver and other processes keep part of a card; a mode "fits" with this much GiB left over.
CARD_MARGIN_GIB = 0.5


def component_counts(checkpoint_name: str) -> dict[str, int]:
    """Parameter counts of the checkpoint's components, built on the meta device (no memory, no download)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from weights.manifest import get_checkpoint

    checkpoint = get_checkpoint(checkpoint_name)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(checkpoint.config("transformer"))
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**checkpoint.config("text_encoder")))
        vae = AutoencoderKLFlux2.from_config(checkpoint.config("vae"))

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    linear = [
        module
        for module in transformer.modules()
        if isinstance(module, torch.nn.Linear)
        and module.in_features % FP8_ALIGNMENT == 0
        and module.out_features % FP8_ALIGNMENT == 0
    ]
    keep = max(checkpoint.config("pipeline")["text_encoder_out_layers"]) + 1
    dropped_layers = text_encoder.model.layers[keep:]
    return {
        "transformer": count(transformer),
        "transformer_fp8_linear_weights": sum(module.weight.numel() for module in linear),
        "transformer_fp8_row_scales": sum(module.out_features for module in linear),
        "text_encoder": count(text_encoder),
        "text_encoder_trimmed": count(text_encoder) - sum(count(layer) for layer in dropped_layers),
        "vae": count(vae),
    }


def paper_modes(counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """GB of weights on the GPU between requests and while a new prompt is encoded, and in host memory."""
    transformer_bf16 = counts["transformer"] * 2
    fp8_linear = counts["transformer_fp8_linear_weights"]
    transformer_fp8 = (
        fp8_linear * 1 + counts["transformer_fp8_row_scales"] * 4 + (counts["transformer"] - fp8_linear) * 2
    )
    vae = counts["vae"] * 2
    text_full = counts["text_encoder"] * 2
    text_trim = counts["text_encoder_trimmed"] * 2
    modes: dict[str, dict[str, float]] = {}
    for transformer_name, transformer in (("bf16", transformer_bf16), ("bf16+fp8", transformer_fp8)):
        for suffix, text, placement in (
            ("", text_full, "device"),
            ("+trim", text_trim, "device"),
            ("+trim+offload", text_trim, "offload"),
            ("+trim+te-cpu", text_trim, "cpu"),
        ):
            steady = transformer + vae + (text if placement == "device" else 0)
            encoding = steady + (text if placement == "offload" else 0)
            modes[transformer_name + suffix] = {
                "gpu_weights_gb": round(steady / GB, 2),
                "gpu_weights_while_encoding_gb": round(encoding / GB, 2),
                "host_weights_gb": round((text if placement != "device" else 0) / GB, 2),
            }
    return modes


def smallest_card(used_gb: float) -> int | None:
    """The smallest common card size (GiB) that holds `used_gb` with the margin, or None."""
    for card in CARD_GIB:
        if used_gb * GB <= (card - CARD_MARGIN_GIB) * 2**30:
            return card
    return None


def encode_costs(backend, repeats: int) -> dict[str, float]:
    """Medians over `repeats` prompts of encoding a new prompt (with `offload`: copying the text encoder in, then
    dropping it as denoising would) and of a repeated one (the prompt cache)."""
    import statistics

    device = torch.device(backend.options.device)
    home = backend.text_encoder_home
    new, copies, cached = [], [], []
    for index in range(repeats):
        copied = home.move_in_ms
        began = time.perf_counter()
        backend.encode_prompt(f"an encoder timing prompt number {index}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        new.append((time.perf_counter() - began) * 1000)
        copies.append(home.move_in_ms - copied)
        home.release()
        began = time.perf_counter()
        backend.encode_prompt(f"an encoder timing prompt number {index}")
        cached.append((time.perf_counter() - began) * 1000)
    return {
        "repeats": repeats,
        "new_prompt_ms": round(statistics.median(new), 2),
        "of_which_copy_in_ms": round(statistics.median(copies), 2),
        "cached_prompt_ms": round(statistics.median(cached), 3),
    }


def measure_variant(args: argparse.Namespace, text: str, edit_source) -> dict[str, Any]:
    variant = parse_variant(text)
    device = torch.device(args.device)
    started = time.perf_counter()
    backend = build_backend(args, variant, prompt_cache_size=32)
    entry: dict[str, Any] = {"variant": variant.name, "load_s": round(time.perf_counter() - started, 1)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        entry["resident_after_load_gb"] = round(torch.cuda.memory_allocated(device) / GB, 2)
    # First-call costs (kernel selection, allocator growth) stay out of the figures.
    backend.generate(GenerationRequest(prompt="warm-up", seed=0, steps=1, image=edit_source))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    home = backend.text_encoder_home
    runs = {}
    for label, prompt in (("new_prompt", "make the sky red"), ("cached_prompt", "make the sky red"),
                          ("another_new_prompt", "make the grass blue")):  # fmt: skip
        moves, move_ms = home.moves_in, home.move_in_ms
        began = time.perf_counter()
        result = backend.generate(GenerationRequest(prompt=prompt, seed=1, steps=args.steps, image=edit_source))
        runs[label] = {
            "total_ms": round((time.perf_counter() - began) * 1000, 1),
            "encode_prompt_ms": round(result.timings_ms["encode_prompt"], 1),
            "text_encoder_copies_in": home.moves_in - moves,
            "text_encoder_copy_in_ms": round(home.move_in_ms - move_ms, 1),
        }
    entry["runs"] = runs
    entry["encode"] = encode_costs(backend, args.encode_repeats)
    entry["working_size"] = list(result.details["working_size"])
    entry.update(gpu_memory(device))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        entry["device_used_gb"] = round((total - free) / GB, 2)
        entry["smallest_card_gib"] = smallest_card(entry["device_used_gb"])
    del backend, result
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = component_counts(args.checkpoint)
    report: dict[str, Any] = {
        "tool": "memory",
        "machine": machine(),
        "settings": vars(args).copy(),
        "paper": {
            "what": "weights only (parameter counts on the meta device x bytes); activations, CUDA context and "
            "allocator slack come on top",
            "checkpoint": args.checkpoint,
            "parameters": counts,
            "modes": paper_modes(counts),
        },
    }
    if args.variants:
        report["gpu"] = describe_gpu(args.device)
        edit_h, edit_w = parse_hw(args.edit_input)
        edit_source = test_image(edit_w, edit_h)
        report["measured"] = []
        for text in args.variants.split(","):
            report["measured"].append(measure_variant(args, text, edit_source))
            # Written after every variant: a run stopped by a time limit keeps what it measured.
            write_report(report, args.out)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench memory", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--paper", action="store_true", help="weights on paper only (the default without a source)")
    source.add_argument("--tiny", action="store_true", help="measure the tiny random model")
    source.add_argument("--random-weights", action="store_true", help="measure the full-size architecture")
    source.add_argument("--weights", help="measure a checkpoint directory in diffusers layout")
    parser.add_argument("--checkpoint", default="flux2-klein-4b")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", help="MODE:DTYPE[+OPTION...] list, as for the pipeline benchmark")
    parser.add_argument("--attention-backend")
    parser.add_argument("--trim-text-encoder", action="store_true", help="trim in every variant")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--edit-input", default="1024x1024", help="HEIGHTxWIDTH of the edit's input image")
    parser.add_argument("--encode-repeats", type=int, default=5, help="prompts timed for the encoding costs")
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.variants and not (args.tiny or args.random_weights or args.weights):
        parser.error("--variants measures a model: add --tiny, --random-weights or --weights DIR")
    if not args.variants:
        args.paper = True
    try:
        parse_hw(args.edit_input)
        [parse_variant(text) for text in (args.variants or "").split(",") if text]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    report = run(args)
    write_report(report, args.out)
    sys.stdout.write("on paper, weights only (GB): GPU between requests / GPU while encoding / host\n")
    for mode, figures in report["paper"]["modes"].items():
        sys.stdout.write(
            f"  {mode:>22}: {figures['gpu_weights_gb']:6.2f} / {figures['gpu_weights_while_encoding_gb']:6.2f} / "
            f"{figures['host_weights_gb']:5.2f}\n"
        )
    for entry in report.get("measured", []):
        runs = entry["runs"]
        sys.stdout.write(
            f"  measured {entry['variant']:>22}: new prompt {runs['new_prompt']['total_ms']} ms "
            f"(encode {runs['new_prompt']['encode_prompt_ms']}), cached {runs['cached_prompt']['total_ms']} ms"
            + f"; encoding a new prompt {entry['encode']['new_prompt_ms']} ms (copy-in "
            f"{entry['encode']['of_which_copy_in_ms']}), a cached one {entry['encode']['cached_prompt_ms']} ms"
            + (f", peak reserved {entry['peak_reserved_gb']} GB" if "peak_reserved_gb" in entry else "")
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
