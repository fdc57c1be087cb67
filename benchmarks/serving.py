"""Serving benchmark: latency and throughput of any OpenAI-style image endpoint (ours or the hosted API).

Closed loop (`--concurrency 1,2,4,8`: that many clients, each sending its next request when the last
one answers) or open loop (`--rate 0.5,1,2`: Poisson arrivals at that many requests per second,
whatever the server does). Each point has a warm-up, then runs until `--requests` answers or
`--duration` seconds, whichever comes first, and reports p50/p90/p99/max latency, images per second,
errors by status, the 429 rate and, where the server sends `server-timing`, the median of each stage.
Requests use only the hosted API's documented fields (plus `--extra` JSON), so the same command
measures the hosted API and this server side by side.

    python -m benchmarks serving --base-url http://127.0.0.1:8000/v1 --api-key KEY \\
        --endpoint edits --concurrency 1,2,4 --requests 40 --out benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.assets import EDIT_SIZES, edit_inputs, load_prompts
from benchmarks.stats import machine, parse_server_timing, percentile, plot_points, summary_ms, write_report


@dataclass
class Sample:
    latency_s: float
    status: int | None  # None: the request never got an HTTP answer
    images: int = 0
    stages_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Target:
    base_url: str
    api_key: str | None
    endpoint: str
    model: str
    size: str
    steps: int
    cfg_scale: float
    response_format: str
    extra: dict[str, Any]
    prompts: list[str]
    inputs: list[tuple[str, bytes]]

    def request(self, index: int) -> dict[str, Any]:
        """httpx.post keyword arguments for request number `index` (prompt, seed and input rotate)."""
        fields: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompts[index % len(self.prompts)],
            "response_format": self.response_format,
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "seed": index,
            **self.extra,
        }
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = f"{self.base_url.rstrip('/')}/images/{self.endpoint}"
        if self.endpoint == "generations":
            return {"url": url, "json": {**fields, "size": self.size}, "headers": headers}
        name, data = self.inputs[index % len(self.inputs)]
        form = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in fields.items()}
        return {"url": url, "data": form, "files": {"image": (name, data, "image/png")}, "headers": headers}


async def send(client: httpx.AsyncClient, target: Target, index: int) -> Sample:
    started = time.perf_counter()
    try:
        response = await client.post(**target.request(index))
    except httpx.HTTPError:
        return Sample(time.perf_counter() - started, None)
    latency = time.perf_counter() - started
    images = 0
    if response.status_code == 200:
        try:
            images = len(response.json().get("data", []))
        except ValueError:
            pass
    return Sample(latency, response.status_code, images, parse_server_timing(response.headers.get("server-timing")))


def summarize(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ok = [sample for sample in samples if sample.status == 200]
    statuses = Counter("transport" if sample.status is None else str(sample.status) for sample in samples)
    stages: dict[str, list[float]] = {}
    for sample in ok:
        for stage, value in sample.stages_ms.items():
            stages.setdefault(stage, []).append(value)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "wall_s": round(wall_s, 3),
        "latency_ms": summary_ms([sample.latency_s for sample in ok]),
        "images_per_s": round(sum(sample.images for sample in ok) / wall_s, 4) if wall_s > 0 else 0.0,
        "errors": {status: count for status, count in statuses.items() if status != "200"},
        "rate_429": round(statuses.get("429", 0) / len(samples), 4) if samples else 0.0,
        "stages_ms_p50": {stage: round(percentile(values, 50), 2) for stage, values in stages.items()},
    }


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="req", leave=False, file=sys.stderr)


async def closed_loop(client, target: Target, concurrency: int, requests: int, duration: float) -> dict[str, Any]:
    samples: list[Sample] = []
    counter = iter(range(sys.maxsize))
    stop_at = time.perf_counter() + duration
    progress = _progress(requests, f"concurrency {concurrency}")

    async def one_client() -> None:
        while len(samples) < requests and time.perf_counter() < stop_at:
            sample = await send(client, target, next(counter))
            if len(samples) < requests:
                samples.append(sample)
                progress.update(1)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    progress.close()
    return {"concurrency": concurrency, **summarize(samples, time.perf_counter() - started)}


async def open_loop(client, target: Target, rate: float, requests: int, duration: float, seed: int) -> dict[str, Any]:
    arrivals = random.Random(seed)
    progress = _progress(requests, f"rate {rate:g}/s")
    tasks = []
    started = time.perf_counter()
    for index in range(requests):
        if time.perf_counter() - started >= duration:
            break
        task = asyncio.create_task(send(client, target, index))
        task.add_done_callback(lambda _: progress.update(1))
        tasks.append(task)
        await asyncio.sleep(arrivals.expovariate(rate))
    samples = list(await asyncio.gather(*tasks))
    progress.close()
    return {"rate": rate, **summarize(samples, time.perf_counter() - started)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(
        base_url=args.base_url,
        api_key=args.api_key,
        endpoint=args.endpoint,
        model=args.model,
        size=args.size,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        response_format=args.response_format,
        extra=json.loads(args.extra) if args.extra else {},
        prompts=load_prompts(Path(args.prompts)) if args.prompts else load_prompts(),
        inputs=edit_inputs(sizes=args.edit_sizes or EDIT_SIZES) if args.endpoint == "edits" else [],
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    points = []
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        for index in range(args.warmup):
            await send(client, target, -1 - index)
        for concurrency in args.concurrency or []:
            points.append(await closed_loop(client, target, concurrency, args.requests, args.duration))
        for rate in args.rate or []:
            points.append(await open_loop(client, target, rate, args.requests, args.duration, args.seed))
    settings = {key: value for key, value in vars(args).items() if key not in ("api_key", "out", "plot")}
    return {"tool": "serving", "machine": machine(with_torch=False), "settings": settings, "points": points}


def _edit_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """--edit-sizes HEIGHTxWIDTH,... as (width, height) pairs, the order PIL uses."""
    sizes = []
    for size in text.split(","):
        try:
            height, width = (int(side) for side in size.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{size!r} is not HEIGHTxWIDTH, e.g. 1024x1024") from None
        sizes.append((width, height))
    return tuple(sizes)


def _numbers(kind):
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench serving", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="API base, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", help="bearer key (never written to the results)")
    parser.add_argument("--endpoint", choices=("generations", "edits"), default="generations")
    parser.add_argument("--model", default="step-image-edit-2")
    parser.add_argument("--size", default="1024x1024", help="generations: HEIGHTxWIDTH")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--response-format", choices=("b64_json", "url"), default="b64_json")
    parser.add_argument(
        "--edit-sizes",
        type=_edit_sizes,
        help="edits: input sizes HEIGHTxWIDTH,... sent in turn (default: six shapes from 512x512 to 1536x2048)",
    )
    parser.add_argument("--extra", help="more JSON fields for every request, e.g. '{\"text_mode\": true}'")
    parser.add_argument("--prompts", help="a file of prompts, one per line (default: the bundled set)")
    parser.add_argument("--concurrency", type=_numbers(int), help="closed-loop clients, e.g. 1,2,4,8,16")
    parser.add_argument("--rate", type=_numbers(float), help="open-loop Poisson arrivals per second, e.g. 0.5,1,2")
    parser.add_argument("--requests", type=int, default=20, help="answers per point (an upper bound)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per point (an upper bound)")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent and discarded first")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--plot", help="PNG plot (default: next to --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.concurrency and not args.rate:
        args.concurrency = [1]
    report = asyncio.run(run(args))
    out = write_report(report, args.out)
    closed = [point for point in report["points"] if "concurrency" in point and point["ok"]]
    opened = [point for point in report["points"] if "rate" in point and point["ok"]]
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = (
        f"{args.endpoint} {args.size if args.endpoint == 'generations' else ''} {args.steps} steps @ {args.base_url}"
    )
    if closed:
        plot_points(closed, "concurrency", "concurrent clients", title, plot)
    elif opened:
        plot_points(opened, "rate", "arrivals per second (Poisson)", title, plot)
    for point in report["points"]:
        sweep = f"concurrency {point['concurrency']}" if "concurrency" in point else f"rate {point['rate']}/s"
        latency = point["latency_ms"]
        sys.stdout.write(
            f"{sweep:>16}: ok {point['ok']}/{point['requests']}  p50 {latency['p50']} ms  p99 {latency['p99']} ms  "
            f"{point['images_per_s']} img/s  errors {point['errors']}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
