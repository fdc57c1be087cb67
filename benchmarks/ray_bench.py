"""Ray benchmark: what the Ray Serve path costs against `stepimage serve`, and how it scales with replicas.

One run, on one machine, tiny backend, one torch thread per model (OMP_NUM_THREADS=1 for the single
process, `torch_threads: 1` for each model replica):

1. **Added latency**: `stepimage serve` and the Ray application (one model replica) run side by side;
   sequential requests alternate between them, so both see the same machine load. For each request,
   overhead = client latency - the pipeline time the server reports (encode_prompt + denoise + decode);
   the added latency is the Ray path's median overhead minus the single process's.
2. **Images per second** with one and with two model replicas: a closed loop of `--concurrency`
   clients against the Ray application, after a warm-up.
3. **What the cores allow**: the same closed loop against one `stepimage serve` process, then against
   two at once (half the clients each). Two processes that share nothing but the machine are the most
   that two replicas could give here; the Ray figure is read against that ceiling.

Requests are 1024x1024 generations, `response_format=b64_json`, `output_format=jpeg` by default. Other
work on the machine slows everything down: the report records `uptime` before and after.

    python -m benchmarks ray --out benchmarks/results/ray-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.overhead import PIPELINE_STAGES, start_server, wait_ready
from benchmarks.stats import free_port, machine, parse_server_timing, percentile, summary_ms, write_report
from server.protocol import DEFAULT_SIZES

APP = "stepimage-bench"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def one_thread_per_model() -> Iterator[None]:
    """Processes started inside (the single server, Ray's workers) use one torch thread."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Client:
    def __init__(self, base_url: str, body: dict[str, Any]) -> None:
        self.base_url = base_url
        self.body = body
        self.http = httpx.Client(timeout=600)

    def generate(self, seed: int) -> tuple[float, float]:
        """One request: (client latency, pipeline time the server reports), in seconds."""
        started = time.perf_counter()
        response = self.http.post(f"{self.base_url}/v1/images/generations", json={**self.body, "seed": seed})
        response.json()
        latency = time.perf_counter() - started
        response.raise_for_status()
        stages = parse_server_timing(response.headers.get("server-timing"))
        return latency, sum(stages.get(stage, 0.0) for stage in PIPELINE_STAGES) / 1000

    def close(self) -> None:
        self.http.close()


def side_by_side(single: Client, ray_app: Client, requests: int, warmup: int) -> dict[str, Any]:
    samples: dict[str, list[tuple[float, float]]] = {"single": [], "ray": []}
    for index in range(requests + warmup):
        for name, client in (("single", single), ("ray", ray_app)):
            sample = client.generate(index)
            if index >= warmup:
                samples[name].append(sample)
    report: dict[str, Any] = {}
    for name, values in samples.items():
        report[name] = {
            "latency_ms": summary_ms([latency for latency, _ in values]),
            "pipeline_ms_p50": round(percentile([p * 1000 for _, p in values], 50), 2),
            "overhead_ms": summary_ms([latency - pipeline for latency, pipeline in values]),
        }
    for measure in ("overhead", "latency"):
        added = report["ray"][f"{measure}_ms"]["p50"] - report["single"][f"{measure}_ms"]["p50"]
        report[f"added_{measure}_ms_p50"] = round(added, 2)
    return report


def closed_loop(base_url: str, body: dict[str, Any], concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    """`concurrency` clients send `warmup` then `requests` requests in all; images/s over the measured part."""
    lock = threading.Lock()
    issued = 0
    done_times: list[float] = []
    latencies: list[float] = []
    errors: list[str] = []

    def client_loop() -> None:
        nonlocal issued
        client = Client(base_url, body)
        try:
            while True:
                with lock:
                    if issued >= warmup + requests:
                        return
                    index = issued
                    issued += 1
                try:
                    latency, _ = client.generate(10_000 + index)
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    done_times.append(time.perf_counter())
                    if index >= warmup:
                        latencies.append(latency)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(done_times)
    # Measured window: from the warmup-th answer to the last one.
    window = ordered[-1] - ordered[warmup - 1] if warmup else ordered[-1] - ordered[0]
    measured = len(ordered) - max(warmup, 1)
    return {
        "concurrency": concurrency,
        "requests": measured,
        "images_per_s": round(measured / window, 4) if window > 0 else None,
        "latency_ms": summary_ms(latencies),
        "errors": errors,
    }


def two_processes(bases: list[str], body: dict[str, Any], concurrency: int, requests: int) -> dict[str, Any]:
    """The closed loop against each of two servers at once, half the clients and requests each."""
    points: list[dict[str, Any]] = [{}, {}]

    def drive(index: int) -> None:
        points[index] = closed_loop(bases[index], body, max(1, concurrency // 2), max(2, requests // 2), 1)

    threads = [threading.Thread(target=drive, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rates = [point.get("images_per_s") for point in points]
    return {
        "images_per_s": round(sum(rates), 4) if all(rates) else None,
        "per_process": points,
    }


def ray_args(size: str, storage: Path, replicas: int) -> dict[str, Any]:
    extra = [] if size in DEFAULT_SIZES else [size]
    return {
        "settings": {
            "backend": "tiny",
            "warmup": False,
            "extra_sizes": extra,
            "storage_dir": str(storage),
            "max_batch_size": 1,
            "log_level": "warning",
        },
        "min_model_replicas": replicas,
        "model_cpus": 1,
        "torch_threads": 1,
        "ingress_cpus": 0.5,
    }


def deploy(base_url: str, replicas: int, size: str, storage: Path, timeout: float = 300) -> None:
    """(Re)deploy the application with `replicas` model replicas and wait until its /ready says 200."""
    from ray import serve

    from server.ray_serve.app import build_app

    with contextlib.suppress(Exception):
        serve.delete(APP)
    serve.run(build_app(ray_args(size, storage, replicas)), name=APP, route_prefix="/")
    deadline = time.monotonic() + timeout
    while httpx.get(f"{base_url}/ready", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the Ray application was not ready in time")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    body = {"prompt": "a lighthouse on a cliff", "size": args.size, "steps": args.steps,
            "response_format": "b64_json", "output_format": args.output_format}  # fmt: skip
    report: dict[str, Any] = {"tool": "ray", "machine": machine(), "settings": vars(args).copy()}
    report["uptime_before"] = uptime()
    with tempfile.TemporaryDirectory(prefix="stepimage-ray-bench-") as tmp, one_thread_per_model():
        tmp_path = Path(tmp)
        port = free_port()
        single_base = f"http://127.0.0.1:{port}"
        process = start_server(port, tmp_path / "single-files", tmp_path / "single.log", args.size)
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024 * 1024, log_to_driver=False)
        try:
            ray_port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
            ray_base = f"http://127.0.0.1:{ray_port}"
            deploy(ray_base, 1, args.size, tmp_path / "ray-files")
            wait_ready(single_base, process)
            single, ray_client = Client(single_base, body), Client(ray_base, body)
            try:
                report["latency"] = side_by_side(single, ray_client, args.requests, args.warmup)
            finally:
                single.close()
                ray_client.close()
            second_port = free_port()
            second = start_server(second_port, tmp_path / "second-files", tmp_path / "second.log", args.size)
            try:
                wait_ready(f"http://127.0.0.1:{second_port}", second)
                alone = closed_loop(single_base, body, args.concurrency, args.throughput_requests, 2)
                both = two_processes([single_base, f"http://127.0.0.1:{second_port}"], body, args.concurrency,
                                     args.throughput_requests)  # fmt: skip
            finally:
                second.terminate()
                second.wait(60)
            process.terminate()
            process.wait(60)
            report["ceiling"] = {"1_process": alone, "2_processes": both}
            if alone["images_per_s"] and both["images_per_s"]:
                report["ceiling_2_over_1"] = round(both["images_per_s"] / alone["images_per_s"], 3)
            throughput = {}
            for replicas in (1, 2):
                if replicas > 1:
                    deploy(ray_base, replicas, args.size, tmp_path / "ray-files")
                throughput[replicas] = closed_loop(ray_base, body, args.concurrency, args.throughput_requests, 2)
            report["throughput"] = {f"{n}_replicas": point for n, point in throughput.items()}
            one, two = throughput[1]["images_per_s"], throughput[2]["images_per_s"]
            report["scaling_2_over_1"] = round(two / one, 3) if one and two else None
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(60)
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    report["uptime_after"] = uptime()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench ray", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output-format", default="jpeg", choices=("png", "jpeg", "webp"))
    parser.add_argument("--requests", type=int, default=15, help="measured requests per server, side by side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients for images per second")
    parser.add_argument("--throughput-requests", type=int, default=16)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    report = run(build_parser().parse_args(argv))
    write_report(report, report["settings"]["out"])
    latency = report["latency"]
    sys.stdout.write(
        f"added overhead p50 {latency['added_overhead_ms_p50']} ms (latency p50 single "
        f"{latency['single']['latency_ms']['p50']} ms, ray {latency['ray']['latency_ms']['p50']} ms)\n"
        f"images/s: 1 replica {report['throughput']['1_replicas']['images_per_s']}, 2 replicas "
        f"{report['throughput']['2_replicas']['images_per_s']} (x{report['scaling_2_over_1']}); two "
        f"stepimage serve processes on the same cores: x{report.get('ceiling_2_over_1')}\n"
        f"load: {report['uptime_before']} / {report['uptime_after']}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
