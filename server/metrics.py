"""Prometheus collectors of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("queue", "encode_prompt", "denoise", "decode", "encode_image", "total")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stepimage_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.images = Counter(
            "stepimage_images_generated", "Images produced, by kind.", ["kind"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "stepimage_stage_seconds",
            "Time spent per stage of an image request.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "stepimage_queue_depth", "Image requests waiting for a device.", registry=self.registry
        )
        self.in_flight = Gauge("stepimage_in_flight", "Image requests running on a device.", registry=self.registry)
        self.batch_size = Histogram(
            "stepimage_batch_size",
            "Images per pipeline call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.rejections = Counter(
            "stepimage_rejections", "Requests refused because the queue was full (429).", registry=self.registry
        )
        self.timeouts = Counter("stepimage_timeouts", "Requests whose deadline passed (504).", registry=self.registry)
        self.cancellations = Counter(
            "stepimage_cancellations",
            "Requests whose client disconnected before the image was ready.",
            registry=self.registry,
        )
        self.gpu_memory = Gauge(
            "stepimage_gpu_memory_bytes",
            "GPU memory per device, as torch counts it: allocated, reserved, peak_allocated.",
            ["device", "kind"],
            registry=self.registry,
        )
        self.ready = Gauge("stepimage_ready", "1 when the model is loaded and warm.", registry=self.registry)
        self.storage_ok = Gauge(
            "stepimage_storage_ok",
            "1 while url results can be stored (free space above the threshold, bucket reachable, last write ok).",
            registry=self.registry,
        )
        self.storage_free_bytes = Gauge(
            "stepimage_storage_free_bytes",
            "Free bytes where url results are stored, as of the last check (NaN for a bucket).",
            registry=self.registry,
        )
        self.storage_failures = Counter(
            "stepimage_storage_failures",
            "Stored-result operations that failed, by operation (write, read).",
            ["operation"],
            registry=self.registry,
        )

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, value in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(value / 1000)

    def observe_device_memory(self, device: str) -> None:
        if not device.startswith("cuda"):
            return
        import torch

        self.gpu_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(device))
        self.gpu_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(device))
        self.gpu_memory.labels(device, "peak_allocated").set(torch.cuda.max_memory_allocated(device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
