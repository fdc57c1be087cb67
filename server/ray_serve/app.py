"""The Ray Serve application: an HTTP ingress and a model deployment, and `build_app` that wires them.

- **StepImageIngress** serves the whole HTTP contract with the project's own FastAPI app
  (`server.app.create_app`): routes, validation, keys, error envelope, `x-request-id`, `server-timing`,
  metrics, image encoding and result storage. It loads no model and imports no torch; its engine is a
  `RemoteEngine` that hands each request to a model replica.
- **StepImageModel** is one replica per GPU (`model_gpus: 1`), anywhere in the cluster: one backend, its
  warm-up, and the project's Engine (queue, batching, deadlines, step-boundary cancellation). Serve
  starts it, routes to it (at most `max_queue` requests each), health-checks it, restarts it when it
  fails and scales the count between `min_model_replicas` and `max_model_replicas` on the requests in
  flight. The ingress bounds what it sends (see `RemoteEngine`).

A Serve config file names `server.ray_serve.app:build_app` with the arguments of
`server.ray_serve.options.RayAppOptions` (see deploy/ray/).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from pipelines.base import BackendInfo, GenerationRequest
from server.config import Settings
from server.engine import Encoding, Engine, encode_outcome
from server.errors import ApiError
from server.metrics import Metrics
from server.ray_serve.options import RayAppOptions
from server.ray_serve.remote import Crashed, Done, Preview, Refused, RemoteEngine, send_images_as_arrays

logger = logging.getLogger(__name__)

# Room at an ingress replica, beyond the model tier's capacity, for requests that never reach a model: probes,
# /metrics, refusals, and /v1/images/files/ downloads, which hold their slot for as long as a slow client reads.
# Each is a coroutine on the ingress's event loop with no model work, so the room is generous: the ingress must
# never be the one that is full, or clients would wait at Serve's proxy and then get its answer instead of our 429.
INGRESS_HEADROOM = 1024
# Were an ingress full anyway, Serve's default max_queued_requests (-1) would have each proxy hold the requests for
# it without bound and without a word. Bounded at the ingress's own size (Serve counts a request as queued while it
# picks a replica, so a smaller bound could refuse a burst the ingress has room for), a request past it gets the
# proxy's plain-text 503 with this Retry-After.
INGRESS_RETRY_AFTER_S = 5
# Beyond --drain-timeout, the seconds Serve gives a replica to stop before it is killed.
SHUTDOWN_GRACE_S = 5.0


def _configure_logging(level: str) -> None:
    # The same format and levels as `stepimage serve`; Ray collects each replica's stderr in its logs.
    from server.cli import _configure_logging as configure

    configure(level)


class WithoutOwnRequestIdHeader:
    """Serve's HTTP proxy sets `x-request-id` on every response itself, with the id it put on the request
    (the client's, else its own), which the app adopts as the request's id; the app's own copy would be
    a second header with the same value, which clients read as "id, id". This drops the app's copy."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_without_id)


def _import_loader(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@serve.deployment(name="StepImageModel")
class StepImageModel:
    """One model replica: a backend on one device, behind the project's Engine."""

    async def __init__(self, settings: dict[str, Any], torch_threads: int, backend_loader: str | None) -> None:
        from server.backends import load_backend, resolve_device, warm_up_backend

        self.settings = Settings(**settings)
        _configure_logging(self.settings.log_level)
        send_images_as_arrays()
        self.replica = serve.get_replica_context().replica_tag
        # More replicas than cores would fight over them: each uses the threads it reserved.
        import torch

        torch.set_num_threads(torch_threads)
        # Serve never routes more than max_queue requests here; the engine's own bound is looser by one
        # batch, because a batch whose clients all left still counts until it stops at its next step.
        self.engine = Engine(
            max_queue=self.settings.max_queue + self.settings.max_batch_size,
            request_timeout=self.settings.request_timeout,
            metrics=Metrics(),
            max_batch_size=self.settings.max_batch_size,
            batch_wait_ms=self.settings.batch_wait_ms,
        )
        loader = _import_loader(backend_loader) if backend_loader else load_backend
        device = await self.engine.run_blocking(resolve_device, self.settings)
        # A backend that cannot load raises here: Serve reports the replica as failed and retries it.
        backend = await self.engine.run_blocking(loader, self.settings, device)
        if self.settings.warmup:
            await self.engine.run_blocking(warm_up_backend, self.settings, device, backend)
        self.engine.start([(device, backend)])
        info = backend.info
        logger.info("model replica %s ready on %s: backend=%s model=%s", self.replica, device, info.backend, info.model)

    async def run(
        self, request: GenerationRequest, timeout: float, previews: bool, encoding: Encoding | None = None
    ) -> AsyncIterator[Any]:
        """Queue one request on this replica's engine; yield its previews, then the result or the error.

        With an `encoding` the result's images travel encoded, as a few hundred kB of bytes rather than megabytes
        of pixels: a 1024x1024 result cost the ingress about 8 ms more as pixels (stepimage bench ray, 2-core CPU).

        When the caller cancels (client gone, deadline), Serve cancels this generator: the engine's job is
        cancelled with it, leaving the queue or stopping its batch at the next denoising step.
        """
        partials: asyncio.Queue = asyncio.Queue()
        options = {"on_partial": partials.put_nowait} if previews else {}
        job = asyncio.ensure_future(self.engine.submit(request, timeout=timeout, **options))
        waiting: asyncio.Future | None = None
        try:
            while not job.done():
                waiting = asyncio.ensure_future(partials.get())
                await asyncio.wait({job, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield Preview(waiting.result())
                else:
                    waiting.cancel()
            while not partials.empty():
                yield Preview(partials.get_nowait())
            try:
                outcome = job.result()
            except ApiError as error:
                yield Refused.of(error)
                return
            except Exception:
                logger.exception("model replica %s: the request failed", self.replica)
                yield Crashed(self.replica)
                return
            if encoding is not None:
                outcome = await asyncio.to_thread(encode_outcome, outcome, encoding)
            yield Done(outcome, self.replica)
        finally:
            # Cancelled (the caller went away) while waiting: neither the job nor the wait for a preview runs on.
            for task in (job, waiting):
                if task is not None and not task.done():
                    task.cancel()

    def describe(self) -> BackendInfo:
        return self.engine.backend.info

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: no model loaded, or its engine worker has stopped."""
        if not self.engine.workers:
            raise RuntimeError("no model is loaded on this replica")
        for worker in self.engine.workers:
            if worker.task is None or worker.task.done():
                raise RuntimeError(f"the engine worker for {worker.device} has stopped")

    async def __del__(self) -> None:
        # Serve lets ongoing requests finish first (graceful_shutdown_timeout_s); then stop the workers.
        await self.engine.drain(self.settings.drain_timeout)


@serve.deployment(name="StepImageIngress")
@serve.ingress()
class StepImageIngress:
    """The HTTP contract: the project's FastAPI app, serving through the model replicas."""

    def __init__(self, settings: dict[str, Any], model: DeploymentHandle, router_queue: int, retries: int) -> None:
        self.settings = Settings(**settings)
        _configure_logging(self.settings.log_level)
        send_images_as_arrays()
        self.engine = RemoteEngine(
            model,
            request_timeout=self.settings.request_timeout,
            per_replica=self.settings.max_queue,
            router_queue=router_queue,
            retries=retries,
            ingress=serve.get_replica_context().deployment,
        )

    def __serve_build_asgi_app__(self):
        from server.app import create_app

        return WithoutOwnRequestIdHeader(create_app(self.settings, engine=self.engine))


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application from a config file's `args:` (see `RayAppOptions`)."""
    options = args if isinstance(args, RayAppOptions) else RayAppOptions.model_validate(args or {})
    settings = options.build_settings()
    if options.ingress_replicas > 1 and settings.storage == "local":
        logger.warning(
            "%d ingress replicas with storage local: a url link works only through the replicas on the host that "
            "stored it; set storage s3 so that every replica serves every link",
            options.ingress_replicas,
        )
    shutdown = {"graceful_shutdown_timeout_s": settings.drain_timeout + SHUTDOWN_GRACE_S}
    router_queue = options.queue_at_router(settings)
    replica_settings = options.replica_settings(settings)
    model = StepImageModel.options(
        ray_actor_options={"num_cpus": options.model_cpus, "num_gpus": options.model_gpus},
        max_ongoing_requests=settings.max_queue,
        # Only a backstop: the ingress keeps the bound exactly (server/ray_serve/remote.py).
        max_queued_requests=options.model_capacity(settings) + router_queue,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=options.health_check_timeout_s,
        **options.replica_counts(),
        **shutdown,
    ).bind(replica_settings, options.threads, options.backend_loader)
    ingress_capacity = options.model_capacity(settings) + router_queue + INGRESS_HEADROOM
    return StepImageIngress.options(
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_cpus},
        max_ongoing_requests=ingress_capacity,
        max_queued_requests=ingress_capacity,
        backpressure_config={"status_code": 503, "retry_after_s": INGRESS_RETRY_AFTER_S},
        **shutdown,
    ).bind(replica_settings, model, router_queue, options.retries)
