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
        self.queue_depth = Gauge("stepimage_queue_depth", "Image requests waiting or running.", registry=self.registry)
        self.ready = Gauge("stepimage_ready", "1 when the model is loaded and warm.", registry=self.registry)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, value in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(value / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
