"""The engine: one worker per device, fed from one bounded queue, with batching, deadlines and cancellation.

- **One worker per device**, each with its own pipeline replica and its own thread: diffusers pipelines
  are not safe to call concurrently (`scheduler.set_timesteps` mutates shared state) and the event loop
  must never block on torch. Every free worker pulls the oldest waiting request, so a request goes to
  the first device that can start it, which on equal devices is the one that finishes it soonest.
- **Admission control**: requests waiting or running are bounded by `max_queue`; past that a request is
  refused at once with 429 and a Retry-After computed from the measured seconds per image.
- **Deadlines**: each request has one (the server's limit, or less if the client asks); when it passes
  the client gets 504, a queued request leaves the queue, a running one is stopped at its next step.
- **Cancellation**: a client that disconnects is treated the same way, so the GPU moves on.
- **Dynamic batching**: waiting requests with the same batch key (same task, working size, steps, cfg,
  text_mode; see the backend's `batch_key`) run as one pipeline call of up to `max_batch_size` images,
  after an optional short wait for company. A batch stops early only when every request in it is gone:
  cancelling one request never affects the others.
- **Previews**: a request that asks for partial images gets each preview through its `on_partial` callback, called
  on the event loop (the worker thread hands them over), until the request is done or abandoned.
- **Drain**: stop taking requests, finish every accepted one, stop the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipelines.base import Backend, Cancelled, GenerationRequest, GenerationResult, PartialImages
from server import images
from server.errors import ApiError, NotReady, Overloaded, Timeout
from server.metrics import Metrics

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How often a waiting request checks whether its client is still connected.
DISCONNECT_POLL_SECONDS = 0.05


class ClientGone(ApiError):
    """The client closed the connection before its image was ready; nobody reads this response."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


@dataclass
class EngineResult:
    result: GenerationResult
    queue_ms: float
    batch_images: int
    device: str
    # The images already encoded as the submit's `encoding` asked, when the engine did it (then `result.images`
    # may be empty): see Engine.submit.
    encoded: list[bytes] | None = None


@dataclass(frozen=True)
class Encoding:
    """How the client wants its images encoded: output_format and its quality (output_compression)."""

    format: str
    quality: int | None = None

    def encode(self, pictures: list[Any]) -> list[bytes]:
        return [images.encode_image(picture, self.format, self.quality) for picture in pictures]


def encode_outcome(outcome: EngineResult, encoding: Encoding) -> EngineResult:
    """The outcome with its images encoded as `encoding` asks and its pixels dropped; the time it took is the
    result's encode_image stage."""
    started = time.perf_counter()
    encoded = encoding.encode(outcome.result.images)
    timings = {**outcome.result.timings_ms, "encode_image": (time.perf_counter() - started) * 1000}
    result = dataclasses.replace(outcome.result, images=[], timings_ms=timings)
    return dataclasses.replace(outcome, result=result, encoded=encoded)


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    # Set from the event loop, read by the worker thread between denoising steps.
    cancelled: bool = False
    # Receives this request's previews on the event loop.
    on_partial: Callable[[PartialImages], None] | None = None

    def deliver(self, partial: PartialImages) -> None:
        """Hand a preview to the waiting request, unless nobody waits for it any more."""
        if self.on_partial is not None and not self.cancelled and not self.future.done():
            self.on_partial(partial)

    @property
    def images(self) -> int:
        return self.request.n


class BatchCancel:
    """What a running batch polls between steps: stop only once every request in it is gone."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(job.cancelled for job in self.jobs)

    def request_cancelled(self, index: int) -> bool:
        """Whether the batch's `index`-th request is gone: its rows run on with the others, but no preview is made
        for it."""
        return self.jobs[index].cancelled


@dataclass(eq=False)
class Worker:
    device: str
    backend: Backend
    executor: ThreadPoolExecutor
    running: list[Job] = field(default_factory=list)
    task: asyncio.Task | None = None


class Engine:
    def __init__(
        self,
        *,
        max_queue: int,
        request_timeout: float,
        metrics: Metrics,
        max_batch_size: int = 1,
        batch_wait_ms: float = 0.0,
    ) -> None:
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.metrics = metrics
        self.workers: list[Worker] = []
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepimage-loader")
        self._queue: list[Job] = []
        self._changed: asyncio.Condition | None = None
        self._accepting = True
        self._stopping = False
        # Seconds per image, measured (moving average); the first guess only shapes the first Retry-After.
        self._seconds_per_image = 2.0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend | None:
        """The first device's backend: what /v1/models describes."""
        return self.workers[0].backend if self.workers else None

    @property
    def accepting(self) -> bool:
        return self._accepting

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run model loading or warm-up off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def start(self, devices_and_backends: list[tuple[str, Backend]]) -> None:
        """Start one worker per (device, backend); called once every backend is loaded and warm."""
        for device, backend in devices_and_backends:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stepimage-{device}")
            worker = Worker(device=device, backend=backend, executor=executor)
            worker.task = asyncio.get_running_loop().create_task(self._work(worker))
            self.workers.append(worker)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if `timeout` seconds passed first."""
        condition = self._condition()
        try:
            async with condition:
                await asyncio.wait_for(condition.wait_for(lambda: self.outstanding == 0), timeout)
            return True
        except TimeoutError:
            return False

    async def drain(self, timeout: float) -> None:
        """Stop taking requests, let the accepted ones finish (up to `timeout` seconds), stop the workers."""
        self.stop_accepting()
        if not await self.wait_idle(timeout):
            logger.warning("shutdown: %d request(s) unfinished after %.0f s", self.outstanding, timeout)
        self._stopping = True
        condition = self._condition()
        async with condition:
            condition.notify_all()
        for worker in self.workers:
            if worker.task is not None:
                worker.task.cancel()
            worker.executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def fail_all(self, error: Callable[[], ApiError]) -> int:
        """Answer every queued and running request with `error()` now and set their cancel flags, so that running
        batches stop at their next step. Returns how many requests were answered. For a shutdown that cannot
        wait: each waiting client gets its error at once instead of a dropped connection."""
        jobs = [*self._queue, *(job for worker in self.workers for job in worker.running)]
        answered = 0
        for job in jobs:
            job.cancelled = True
            if not job.future.done():
                job.future.set_exception(error())
                answered += 1
        condition = self._condition()
        async with condition:
            self._queue.clear()
            self._update_gauges()
            condition.notify_all()
        return answered

    # -- accounting ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(len(worker.running) for worker in self.workers)

    @property
    def outstanding(self) -> int:
        return self.queued + self.running

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queued)
        self.metrics.in_flight.set(self.running)

    def _retry_after(self) -> int:
        images = sum(job.images for job in self._queue) + sum(
            job.images for worker in self.workers for job in worker.running
        )
        return max(1, math.ceil(images * self._seconds_per_image / max(1, len(self.workers))))

    # -- submitting ------------------------------------------------------------------------------

    def _batch_key(self, job_request: GenerationRequest) -> Hashable:
        key_of = getattr(self.workers[0].backend, "batch_key", None)
        # A backend that cannot batch gets a key no other request shares.
        return key_of(job_request) if key_of is not None else object()

    async def submit(
        self,
        request: GenerationRequest,
        *,
        timeout: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        on_partial: Callable[[PartialImages], None] | None = None,
        encoding: Encoding | None = None,
    ) -> EngineResult:
        """Queue `request` and wait for its result. `on_partial` receives its previews (see
        `GenerationRequest.partial_images`) on the event loop while it runs.

        `encoding` says how the caller will encode the images. An engine whose results cross processes encodes them
        where they are made, so that bytes rather than pixels travel (`EngineResult.encoded`); this one leaves the
        pixels to the caller, which encodes them off the event loop while the device's worker moves on to its
        next batch."""
        if not self._accepting:
            raise NotReady("The server is shutting down; retry shortly.", retry_after=5)
        if not self.workers:
            raise NotReady("The model is still loading; retry shortly.", retry_after=5)
        if self.outstanding >= self.max_queue:
            self.metrics.rejections.inc()
            raise Overloaded(
                f"The server is at capacity ({self.outstanding} requests queued or running); retry later.",
                retry_after=self._retry_after(),
            )
        limit = self.request_timeout if timeout is None else min(timeout, self.request_timeout)
        job = Job(
            request=request,
            key=self._batch_key(request),
            future=asyncio.get_running_loop().create_future(),
            on_partial=on_partial,
        )
        condition = self._condition()
        async with condition:
            self._queue.append(job)
            self._update_gauges()
            condition.notify_all()

        watcher = asyncio.create_task(self._watch_client(job, disconnected)) if disconnected is not None else None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=limit)
        except TimeoutError:
            await self._abandon(job)
            self.metrics.timeouts.inc()
            raise Timeout(f"The request did not finish within {limit:g} seconds.") from None
        except asyncio.CancelledError:
            await self._abandon(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _watch_client(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> None:
        while not job.future.done():
            if await disconnected():
                self.metrics.cancellations.inc()
                if not job.future.done():
                    job.future.set_exception(ClientGone("The client closed the connection."))
                await self._abandon(job)
                return
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    async def _abandon(self, job: Job) -> None:
        """Nobody waits for this job any more: drop it from the queue, or let its batch stop early."""
        job.cancelled = True
        if not job.future.done():
            # Whatever the worker produces for it now is dropped, not left as an unread exception.
            job.future.cancel()
        condition = self._condition()
        async with condition:
            if job in self._queue:
                self._queue.remove(job)
                self._update_gauges()
                condition.notify_all()

    # -- working ---------------------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        first = self._queue[0]
        batch, images = [first], first.images
        for job in self._queue[1:]:
            if job.key == first.key and images + job.images <= self.max_batch_size:
                batch.append(job)
                images += job.images
        for job in batch:
            self._queue.remove(job)
        return batch

    def _compatible_images(self) -> int:
        first = self._queue[0]
        return sum(job.images for job in self._queue if job.key == first.key)

    async def _next_batch(self, worker: Worker) -> list[Job] | None:
        condition = self._condition()
        async with condition:
            await condition.wait_for(lambda: bool(self._queue) or self._stopping)
            if self._stopping:
                return None
            if self.batch_wait > 0 and self._compatible_images() < self.max_batch_size:
                # A short wait for company: a fuller batch costs little more than a lone request.
                deadline = time.monotonic() + self.batch_wait
                while self._queue and self._compatible_images() < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        await asyncio.wait_for(condition.wait(), left)
                    except TimeoutError:
                        break
                if not self._queue:
                    return []
            batch = self._take_batch()
            worker.running = batch
            self._update_gauges()
            return batch

    async def _work(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(worker)
            if batch is None:
                return
            if not batch:
                continue
            started = time.perf_counter()
            images = sum(job.images for job in batch)
            self.metrics.batch_size.observe(images)
            try:
                results = await loop.run_in_executor(worker.executor, self._run_batch, worker.backend, batch, loop)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                elapsed = time.perf_counter() - started
                self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (elapsed / images)
                for job, result in zip(batch, results):
                    if not job.future.done():
                        queue_ms = (started - job.enqueued) * 1000
                        job.future.set_result(EngineResult(result, queue_ms, images, worker.device))
            finally:
                self.metrics.observe_device_memory(worker.device)
                condition = self._condition()
                async with condition:
                    worker.running = []
                    self._update_gauges()
                    condition.notify_all()

    @staticmethod
    def _run_batch(backend: Backend, batch: list[Job], loop: asyncio.AbstractEventLoop) -> list[GenerationResult]:
        cancel = BatchCancel(batch)
        if cancel.is_set():
            raise Cancelled()

        def progress(index: int, partial: PartialImages) -> None:
            loop.call_soon_threadsafe(batch[index].deliver, partial)

        generate_batch = getattr(backend, "generate_batch", None)
        if generate_batch is not None:
            wants_previews = any(job.request.partial_images for job in batch)
            if wants_previews:
                return generate_batch([job.request for job in batch], cancel, progress=progress)
            return generate_batch([job.request for job in batch], cancel)
        return [backend.generate(job.request, cancel) for job in batch]
