"""The engine: owns the backend and the one thread that drives it.

diffusers pipelines are not safe to call concurrently (`scheduler.set_timesteps` mutates shared
state), and the event loop must never block on torch, so every backend call (loading, warm-up,
generation) runs on a single dedicated worker thread, one at a time, in arrival order. The engine
also bounds how many requests may wait (429 past that), enforces each request's deadline (504,
and the running job is stopped at its next denoising step), and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.base import Backend, Cancelled, GenerationRequest, GenerationResult
from server.errors import NotReady, Overloaded, Timeout
from server.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineResult:
    result: GenerationResult
    queue_ms: float


class Engine:
    def __init__(self, *, max_queue: int, request_timeout: float, metrics: Metrics) -> None:
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = metrics
        self.backend: Backend | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepimage-worker")
        self._pending = 0
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        # Rough seconds per job, for Retry-After; updated as jobs finish.
        self._seconds_per_job = 2.0

    @property
    def pending(self) -> int:
        return self._pending

    async def run_in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the worker thread (loading and warm-up go through here too)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _retry_after(self) -> int:
        return max(1, round(self._pending * self._seconds_per_job))

    async def submit(self, request: GenerationRequest) -> EngineResult:
        if self.backend is None or not self._accepting:
            raise NotReady("The model is not ready to take requests; retry shortly.", retry_after=5)
        if self._pending >= self.max_queue:
            raise Overloaded(
                f"The server is at capacity ({self._pending} requests queued); retry later.",
                retry_after=self._retry_after(),
            )
        backend = self.backend
        cancel = threading.Event()
        enqueued = time.perf_counter()
        queue_ms = 0.0

        def job() -> GenerationResult:
            nonlocal queue_ms
            started = time.perf_counter()
            queue_ms = (started - enqueued) * 1000
            if cancel.is_set():
                raise Cancelled()
            result = backend.generate(request, cancel)
            # Exponential moving average keeps Retry-After in step with the real job cost.
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.perf_counter() - started)
            return result

        self._pending += 1
        self._idle.clear()
        self.metrics.queue_depth.set(self._pending)
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        future.add_done_callback(self._job_done)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout=self.request_timeout)
        except asyncio.TimeoutError:
            cancel.set()
            raise Timeout(f"The request did not finish within {self.request_timeout:g} seconds.") from None
        except asyncio.CancelledError:
            # The client went away: nobody is waiting for this image, so free the worker for others.
            cancel.set()
            raise
        except Cancelled:
            raise Timeout(f"The request did not finish within {self.request_timeout:g} seconds.") from None
        return EngineResult(result=result, queue_ms=queue_ms)

    def _job_done(self, future: asyncio.Future) -> None:
        self._pending -= 1
        self.metrics.queue_depth.set(self._pending)
        if self._pending == 0:
            self._idle.set()
        if not future.cancelled() and isinstance(future.exception(), Cancelled):
            logger.info("a request was stopped before it finished (deadline passed or client gone)")

    async def drain(self, timeout: float) -> None:
        """Stop taking requests, let the accepted ones finish (up to `timeout` seconds), stop the worker."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            logger.warning("shutdown: %d request(s) still running after %.0f s", self._pending, timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def accepting(self) -> bool:
        return self._accepting
