"""A probe the Ray tests use to see inside model replicas, and the tiny backend wired to it.

The probe is a named Ray actor. Model replicas load `load_probed_tiny` (the app's `backend_loader`
option), which wraps the real tiny backend: every pipeline call reports to the probe which replica
started, finished or cancelled which requests (by seed) after how many denoising steps, and while the
probe's gate is closed each call waits at its step boundaries, still honouring cancellation. So a test
can hold jobs on replicas (from their first step boundary, or only after a few, to let previews out), kill a
replica that provably holds one, see a cancelled job stop, and stop a replica's engine worker once (what a fault
that escapes the engine's error handling does) to see Serve's health check replace the replica.
"""

from __future__ import annotations

import time

import ray

from pipelines.base import Cancelled

PROBE_NAME = "stepimage-test-probe"
PROBE_NAMESPACE = "stepimage-tests"
GATE_POLL_S = 0.02


@ray.remote(num_cpus=0)
class Probe:
    def __init__(self) -> None:
        self.gate_open = True
        self.free_polls = 0
        self.worker_stops = 0
        self.events: list[dict] = []

    def stop_a_worker(self) -> None:
        """The next job to start ends its replica's engine worker instead of running."""
        self.worker_stops += 1

    def take_worker_stop(self) -> bool:
        if self.worker_stops:
            self.worker_stops -= 1
            return True
        return False

    def open_gate(self) -> None:
        self.gate_open = True

    def close_gate(self, free_polls: int = 0) -> None:
        """Hold jobs at their step boundaries, after the first `free_polls` of them."""
        self.gate_open = False
        self.free_polls = free_polls

    def lets_through(self, polls: int) -> bool:
        return self.gate_open or polls <= self.free_polls

    def record(self, event: dict) -> None:
        self.events.append(event)

    def log(self) -> list[dict]:
        return list(self.events)


class WorkerStopped(BaseException):
    """Not an Exception: the engine's worker does not catch it, and its task ends (asyncio lets the loop run on)."""


def probe():
    return ray.get_actor(PROBE_NAME, namespace=PROBE_NAMESPACE)


class GatedSteps:
    """The engine's cancel flag as the pipeline polls it at each step boundary: counts the steps and
    holds there while the probe's gate is closed, unless the job is cancelled meanwhile."""

    def __init__(self, cancel, gate) -> None:
        self.cancel = cancel
        self.gate = gate
        self.polls = 0

    def is_set(self) -> bool:
        self.polls += 1
        while True:
            if self.cancel is not None and self.cancel.is_set():
                return True
            if ray.get(self.gate.lets_through.remote(self.polls)):
                return False
            time.sleep(GATE_POLL_S)


class ProbedBackend:
    def __init__(self, inner, replica: str) -> None:
        self.inner = inner
        self.info = inner.info
        self.replica = replica
        self.probe = probe()

    def _record(self, kind: str, requests, steps: GatedSteps) -> None:
        event = {"kind": kind, "replica": self.replica, "seeds": [r.seed for r in requests], "polls": steps.polls}
        ray.get(self.probe.record.remote(event))

    def batch_key(self, request):
        return self.inner.batch_key(request)

    def generate_batch(self, requests, cancel=None, progress=None):
        steps = GatedSteps(cancel, self.probe)
        self._record("started", requests, steps)
        if ray.get(self.probe.take_worker_stop.remote()):
            self._record("worker stopped", requests, steps)
            raise WorkerStopped()
        previews = {"progress": progress} if progress is not None else {}
        try:
            results = self.inner.generate_batch(requests, steps, **previews)
        except Cancelled:
            self._record("cancelled", requests, steps)
            raise
        self._record("finished", requests, steps)
        return results

    def generate(self, request, cancel=None):
        return self.generate_batch([request], cancel)[0]

    def warm_up(self, sizes, progress=None) -> None:
        self.inner.warm_up(sizes, progress)


def load_probed_tiny(settings, device):
    """The app's `backend_loader` in the Ray tests: the configured (tiny) backend, reporting to the probe."""
    from ray import serve

    from server.backends import load_backend

    return ProbedBackend(load_backend(settings, device), serve.get_replica_context().replica_tag)
