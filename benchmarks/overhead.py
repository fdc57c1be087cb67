"""Overhead benchmark: what the HTTP server adds on top of the pipeline, per request.

Starts `stepimage serve` (tiny backend) as a real process, sends sequential 1024x1024 generations for
every response_format x output_format pair, and reports the median and p90 of

    overhead = client-measured latency - pipeline time the server reports (encode_prompt + denoise + decode)

so it covers request parsing, validation, the hand-off to the worker thread and back, image encoding,
base64 or storing the file, JSON, and the HTTP round trip over loopback. `encode_image` (from the
server's own `server-timing`) is reported beside it, since for large outputs it is most of the cost.

Encoding cost depends on what the picture looks like, and the tiny model paints noise, the worst case
for every encoder. `--content natural` therefore also runs the same server code (in its own process)
with the tiny model's output replaced by a pre-drawn picture of gradients, shapes and text, so the
figures show both the worst case and what real images cost.

    python -m benchmarks overhead --out benchmarks/results/overhead-cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.assets import test_image
from benchmarks.stats import (
    free_port,
    machine,
    parse_server_timing,
    percentile,
    server_ready,
    summary_ms,
    write_report,
)
from server.protocol import DEFAULT_SIZES

PIPELINE_STAGES = ("encode_prompt", "denoise", "decode")
COMBINATIONS = [(fmt, response) for response in ("b64_json", "url") for fmt in ("png", "jpeg", "webp")]


def start_server(port: int, storage: Path, log: Path, size: str) -> subprocess.Popen:
    script = Path(sys.executable).parent / "stepimage"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "server"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPIMAGE_")}
    args = ["serve", "--backend", "tiny", "--port", str(port), "--storage-dir", str(storage), "--no-warmup",
            "--log-level", "warning"]  # fmt: skip
    if size not in DEFAULT_SIZES:
        args += ["--extra-size", size]
    with open(log, "wb") as handle:
        return subprocess.Popen(command + args, stdout=handle, stderr=subprocess.STDOUT, env=env)


class NaturalPictures:
    """The tiny backend, whose noise is swapped for a natural-looking picture of the same size.

    Pictures are drawn once per size and reused, so the swap costs nothing inside the timed path.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        self._pictures: dict[tuple[int, int], Any] = {}

    def _picture(self, size: tuple[int, int]):
        if size not in self._pictures:
            self._pictures[size] = test_image(*size)
        return self._pictures[size]

    def batch_key(self, request):
        return self.inner.batch_key(request)

    def generate_batch(self, requests, cancel=None):
        results = self.inner.generate_batch(requests, cancel)
        for result in results:
            result.images = [self._picture(image.size) for image in result.images]
        return results

    def generate(self, request, cancel=None):
        return self.generate_batch([request], cancel)[0]

    def warm_up(self, sizes, progress=None) -> None:
        for height, width in sizes:
            self._picture((width, height))


def serve_natural(port: int, storage: str, size: str) -> None:
    """Child-process entry: the real app on the tiny backend with natural pictures, over real HTTP."""
    import uvicorn

    from pipelines.flux2_klein import RunOptions
    from pipelines.tiny import load_tiny_backend
    from server.app import create_app
    from server.config import Settings

    height, width = (int(side) for side in size.split("x"))
    backend = NaturalPictures(load_tiny_backend(RunOptions()))
    backend.warm_up([(height, width)])
    extra = [] if size in DEFAULT_SIZES else [size]
    settings = Settings(port=port, storage_dir=Path(storage), warmup=False, extra_sizes=extra)
    uvicorn.run(create_app(settings, backend=backend), host="127.0.0.1", port=port, log_level="warning")


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 120) -> None:
    if not server_ready(base, process, timeout):
        exited = process.poll() is not None
        raise RuntimeError("the server exited before it was ready" if exited else "the server was not ready in time")


def measure(client: httpx.Client, base: str, fmt: str, response_format: str, size: str, repeats: int) -> dict:
    body = {"prompt": "overhead", "size": size, "steps": 1, "seed": 1, "response_format": response_format,
            "output_format": fmt}  # fmt: skip
    overheads, encodes, latencies, sizes = [], [], [], []
    for index in range(repeats + 2):
        started = time.perf_counter()
        response = client.post(f"{base}/v1/images/generations", json={**body, "seed": index})
        payload = response.json()
        latency = time.perf_counter() - started
        response.raise_for_status()
        stages = parse_server_timing(response.headers.get("server-timing"))
        if index < 2:  # the first requests warm the path up
            continue
        pipeline_ms = sum(stages.get(stage, 0.0) for stage in PIPELINE_STAGES)
        latencies.append(latency)
        overheads.append(latency - pipeline_ms / 1000)
        encodes.append(stages.get("encode_image", 0.0))
        sizes.append(len(payload["data"][0].get("b64_json", "")))
    return {
        "output_format": fmt,
        "response_format": response_format,
        "overhead_ms": summary_ms(overheads),
        "encode_image_ms_p50": round(percentile(encodes, 50), 2),
        "overhead_without_encode_ms_p50": round(percentile(overheads, 50) * 1000 - percentile(encodes, 50), 2),
        "latency_ms": summary_ms(latencies),
        "b64_chars_p50": int(percentile(sizes, 50)) if sizes and sizes[0] else None,
    }


def start(content: str, port: int, tmp: Path, size: str):
    """The server for one kind of content: the `stepimage serve` command for the model's own output, the
    same app with natural pictures otherwise; each in its own process, so the client shares no interpreter."""
    if content == "model":
        return start_server(port, tmp / "files", tmp / "server.log", size)
    code = f"from benchmarks.overhead import serve_natural; serve_natural({port}, {str(tmp / 'files')!r}, {size!r})"
    with open(tmp / "server.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for content in args.content.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory(prefix="stepimage-overhead-") as tmp:
            process = start(content, port, Path(tmp), args.size)
            try:
                wait_ready(base, process)
                with httpx.Client(timeout=120) as client:
                    for fmt, response_format in COMBINATIONS:
                        row = measure(client, base, fmt, response_format, args.size, args.repeats)
                        rows.append({"content": content, **row})
            finally:
                process.terminate()
                process.wait(60)
    return {"tool": "overhead", "machine": machine(), "settings": vars(args).copy(), "results": rows}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--content", default="model,natural", help="model (the tiny model's noise), natural (a drawn picture), or both"
    )
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    write_report(report, args.out)
    for row in report["results"]:
        sys.stdout.write(
            f"{row['content']:>7} {row['response_format']:>8} {row['output_format']:>4}: "
            f"overhead p50 {row['overhead_ms']['p50']} ms "
            f"(encode {row['encode_image_ms_p50']} ms, the rest {row['overhead_without_encode_ms_p50']} ms)\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
