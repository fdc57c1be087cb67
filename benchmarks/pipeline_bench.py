"""Per-stage latency of the FLUX.2 [klein] backend, with no HTTP in the way.

Runs text-to-image and edit requests through a backend and writes the median of each stage
(encode_prompt, denoise, decode) and the total to JSON, with the machine's description. Timings are
recorded, never judged.

    # full-size 4B architecture, random weights, on a GPU; eager and compiled
    python benchmarks/pipeline_bench.py --random-weights --device cuda:0 --dtype bf16 --out benchmarks/results/h200.json
    python benchmarks/pipeline_bench.py --random-weights --device cuda:0 --compile --out ...
    # the tiny model on CPU (checks the script, not the model's speed)
    python benchmarks/pipeline_bench.py --tiny --out benchmarks/results/tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.base import GenerationRequest  # noqa: E402
from pipelines.flux2_klein import RunOptions, load_checkpoint_backend, load_random_weights_backend  # noqa: E402
from pipelines.tiny import load_tiny_backend  # noqa: E402


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_backend(args: argparse.Namespace):
    options = RunOptions(
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        attention_backend=args.attention_backend,
        trim_text_encoder=args.trim_text_encoder,
        prompt_cache_size=0 if args.no_prompt_cache else 32,
    )
    if args.tiny:
        return load_tiny_backend(options)
    if args.random_weights:
        from weights.manifest import get_checkpoint

        return load_random_weights_backend(get_checkpoint(args.checkpoint), options)
    return load_checkpoint_backend(Path(args.weights), args.checkpoint, options)


def run(backend, request: GenerationRequest, repeats: int) -> dict:
    rows = []
    for index in range(repeats):
        started = time.perf_counter()
        # A fresh prompt per run unless the cache is being measured: encode_prompt is then real work.
        result = backend.generate(request if index == 0 else _with_prompt(request, f"{request.prompt} #{index}"))
        rows.append({**result.timings_ms, "total": (time.perf_counter() - started) * 1000})
    return {stage: round(statistics.median(row[stage] for row in rows), 1) for stage in rows[0]}


def _with_prompt(request: GenerationRequest, prompt: str) -> GenerationRequest:
    from dataclasses import replace

    return replace(request, prompt=prompt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="the tiny random model")
    source.add_argument("--random-weights", action="store_true", help="full-size architecture, random weights")
    source.add_argument("--weights", help="a checkpoint directory in diffusers layout")
    parser.add_argument("--checkpoint", default="flux2-klein-4b")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention-backend")
    parser.add_argument("--trim-text-encoder", action="store_true")
    parser.add_argument("--no-prompt-cache", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH for text-to-image")
    parser.add_argument("--edit-size", default="1024x1024", help="WIDTHxHEIGHT of the edit input")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    backend = build_backend(args)
    load_s = time.perf_counter() - started
    height, width = (int(side) for side in args.size.split("x"))
    edit_w, edit_h = (int(side) for side in args.edit_size.split("x"))
    started = time.perf_counter()
    backend.warm_up([(height, width), (768, 1360)])
    warm_up_s = time.perf_counter() - started

    text_to_image = GenerationRequest(prompt="a lake at dawn", seed=1, steps=args.steps, height=height, width=width)
    edit = GenerationRequest(
        prompt="make the sky red", seed=1, steps=args.steps, image=Image.new("RGB", (edit_w, edit_h), "grey")
    )
    report = {
        "machine": machine(),
        "backend": backend.info.__dict__,
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "load_s": round(load_s, 1),
        "warm_up_s": round(warm_up_s, 1),
        "text_to_image_ms": run(backend, text_to_image, args.repeats),
        "edit_ms": run(backend, edit, args.repeats),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
