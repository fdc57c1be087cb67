"""What the API's extensions cost per request: partial images (previews) and masks, measured in-process.

For each number of partial images the same text-to-image request runs `--repeats` times and the median total is
kept; the cost of one preview is the slope over 0..3 previews. A masked edit is compared with the same edit without
a mask. Preview decoding is also timed alone: the pooled decode the server uses against a full-resolution decode.

    stepimage bench extensions --out benchmarks/results/extensions-tiny-cpu.json
    stepimage bench extensions --backend flux2-klein --random-weights --device cuda:0 --out extensions-gpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.stats import machine, write_report
from pipelines.base import GenerationRequest


def _median_ms(run, repeats: int) -> float:
    run()  # the first call pays one-time costs
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 1)


def _picture(width: int, height: int) -> Image.Image:
    # A smooth picture: what the VAE encodes in an edit matters little to the timing, but noise would be atypical.
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    planes = [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2]
    return Image.fromarray(np.stack(planes, axis=-1).astype(np.uint8))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipelines import flux2_klein
    from server.backends import load_backend
    from server.config import Settings

    settings = Settings(
        backend=args.backend, device=args.device, random_weights=args.random_weights, compile=args.compile
    )
    backend = load_backend(settings, args.device)
    height, width = (int(side) for side in args.size.split("x"))
    report: dict[str, Any] = {"tool": "extensions", "machine": machine(), "settings": vars(args).copy()}
    report["backend"] = {"backend": backend.info.backend, "model": backend.info.model, "dtype": backend.info.dtype}

    totals = {}
    for partials in range(4):
        request = GenerationRequest(
            prompt="a lake at dawn", seed=1, steps=args.steps, height=height, width=width, partial_images=partials
        )
        totals[partials] = _median_ms(
            lambda request=request: backend.generate_batch([request], None, progress=lambda index, partial: None),
            args.repeats,
        )
    slope = float(np.polyfit(list(totals), list(totals.values()), 1)[0])
    report["partial_images"] = {
        "total_ms_by_partial_images": totals,
        "added_ms_per_partial_image": round(slope, 1),
    }

    latents = torch.randn(1, backend.pipe.vae.config.latent_channels, height // 8, width // 8).to(
        backend.device, backend.pipe.vae.dtype
    )
    loop = flux2_klein._DenoisingLoop(backend, [request], [0], None, (height, width), None)
    report["preview_decode"] = {
        "full_resolution_ms": _median_ms(lambda: backend.decode_batch(latents), args.repeats),
        "pooled_as_served_ms": _median_ms(lambda: loop.decode_preview(latents), args.repeats),
    }

    source = _picture(args.edit_width, args.edit_height)
    mask_plane = np.zeros((args.edit_height, args.edit_width), dtype=np.uint8)
    mask_plane[args.edit_height // 4 : 3 * args.edit_height // 4, args.edit_width // 4 : 3 * args.edit_width // 4] = 255
    mask = Image.fromarray(mask_plane)
    plain = GenerationRequest(prompt="make the sky red", seed=1, steps=args.steps, image=source)
    masked = GenerationRequest(prompt="make the sky red", seed=1, steps=args.steps, image=source, mask=mask)
    plain_ms = _median_ms(lambda: backend.generate(plain), args.repeats)
    masked_ms = _median_ms(lambda: backend.generate(masked), args.repeats)
    report["mask"] = {
        "edit_size": f"{args.edit_height}x{args.edit_width}",
        "edit_ms": plain_ms,
        "masked_edit_ms": masked_ms,
        "added_ms": round(masked_ms - plain_ms, 1),
        "mask_preparation_ms": _median_ms(lambda: flux2_klein.plan_edit(masked), args.repeats),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepimage bench extensions", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tiny", choices=("tiny", "flux2-klein"))
    parser.add_argument("--random-weights", action="store_true", help="flux2-klein: full size, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--size", default="1024x1024", help="text-to-image HEIGHTxWIDTH")
    parser.add_argument("--edit-height", type=int, default=1024)
    parser.add_argument("--edit-width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/extensions.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    path = write_report(run(args), args.out)
    print(path.read_text())
    return 0
