"""Shared pieces of the benchmark tools: percentiles, server-timing parsing, machine description, plots, and
starting on a free port and waiting for the servers they measure. Standard library only at import: the GPU kit
imports it before it has installed anything."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of durations given in seconds, reported in milliseconds."""
    as_ms = [value * 1000 for value in values_s]
    return {
        "p50": _round(percentile(as_ms, 50)),
        "p90": _round(percentile(as_ms, 90)),
        "p99": _round(percentile(as_ms, 99)),
        "max": _round(max(as_ms) if as_ms else None),
        "mean": _round(statistics.fmean(as_ms) if as_ms else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """'queue;dur=1.2, denoise;dur=300' -> {'queue': 1.2, 'denoise': 300.0} (milliseconds)."""
    stages: dict[str, float] = {}
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    stages[name] = float(value)
                except ValueError:
                    pass
    return stages


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write a benchmark's JSON report, creating its folder."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def machine(with_torch: bool = True) -> dict[str, Any]:
    """This machine; `with_torch` adds torch's version and GPUs (the serving client leaves it out: importing torch
    costs seconds per run, and the client's torch says nothing about the server it measures)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if not with_torch:
        return info
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:  # the serving benchmark needs no torch on the client machine
        pass
    return info


def plot_points(points: list[dict[str, Any]], x_key: str, x_label: str, title: str, path: Path) -> None:
    """Latency percentiles (left axis) and images per second (right axis) against the swept variable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [point[x_key] for point in points]
    figure, latency_axis = plt.subplots(figsize=(7, 4.2))
    for name, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        latency_axis.plot(xs, [point["latency_ms"][name] for point in points], style, label=f"latency {name}")
    latency_axis.set_xticks(xs)
    latency_axis.set_xlabel(x_label)
    latency_axis.set_ylabel("latency (ms)")
    throughput_axis = latency_axis.twinx()
    throughput_axis.plot(xs, [point["images_per_s"] for point in points], "k-", linewidth=2, label="images/s")
    throughput_axis.set_ylabel("images per second")
    handles = latency_axis.get_legend_handles_labels()
    more = throughput_axis.get_legend_handles_labels()
    latency_axis.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    latency_axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_ready(base: str, process: subprocess.Popen, timeout: float, poll_s: float = 0.2) -> bool:
    """Whether the server at `base` said 200 on /ready within `timeout` seconds; False at once if it exited."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False
