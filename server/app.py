"""The FastAPI application: lifespan (load, warm up, sweep, drain), middleware, error handlers, routers.

`create_app(settings, backend=None)` builds one independent app. Given a backend, it serves it at
once (tests share one tiny backend); otherwise the lifespan loads the configured backend on the
engine's worker thread while /health already answers and /ready says 503. Given `engine=` (an object
with the Engine's submit/drain interface whose models run elsewhere, such as Ray Serve's model
replicas), it loads nothing and /ready follows that engine's own readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.base import Backend
from server import errors
from server.config import Settings
from server.engine import ClientGone, Engine
from server.metrics import Metrics
from server.openapi import create_documented_app
from server.protocol import QUOTED_CHARS, quoted
from server.routes import health, images, models, ui
from server.serving import ImageService
from server.storage import ResultStore, open_store

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Probes and scrapes arrive every few seconds from load balancers, orchestrators and Prometheus: logged at debug,
# so that the info log is one line per real request.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
# How often the app asks an external engine whether any of its model replicas is ready.
READINESS_POLL_SECONDS = 1.0


class ExternalEngine(Protocol):
    """What the app needs from an engine whose models run outside this process (see `create_app`)."""

    metrics: Metrics

    @property
    def backend(self) -> Any: ...  # something with `.info` (a BackendInfo) once known, else None

    @property
    def outstanding(self) -> int: ...

    async def submit(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        on_partial: Callable[[Any], None] | None = None,
        encoding: Any = None,  # an engine.Encoding: how the caller will encode the images
    ) -> Any: ...

    async def ready(self) -> bool: ...

    def stop_accepting(self) -> None: ...

    async def wait_idle(self, timeout: float) -> bool: ...

    async def drain(self, timeout: float) -> None: ...

    async def fail_all(self, error: Callable[[], errors.ApiError]) -> int: ...


@dataclass
class AppState:
    settings: Settings
    engine: Engine | ExternalEngine
    store: ResultStore
    metrics: Metrics
    service: ImageService
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    # The model finished loading (ready or not since): a stop before that has no work to drain.
    loaded: bool = False
    # Set when the server should stop on its own (the model could not load); the runner polls it.
    stop_requested: bool = False
    # Requests answered 503 because the server stopped before they finished.
    cut_short: int = 0
    started_at: int = field(default_factory=lambda: int(time.time()))

    def begin_drain(self) -> None:
        """/ready turns 503 and new image requests get 503; accepted ones go on."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        self.engine.stop_accepting()

    async def drain(self) -> None:
        """Stop taking work and wait (up to the drain timeout) for the accepted requests to finish; answer
        whatever is still unfinished then with 503, as `stop_now` does."""
        self.begin_drain()
        if not await self.engine.wait_idle(self.settings.drain_timeout):
            logger.warning(
                "drain: %d request(s) still unfinished after %.0f s: answering them 503",
                self.engine.outstanding,
                self.settings.drain_timeout,
            )
            await self.stop_now()

    async def stop_now(self) -> None:
        """Stop without waiting: every queued and running request is answered 503 + Retry-After at once and its
        work stops at the next denoising step."""
        self.begin_drain()
        self.cut_short += await self.engine.fail_all(shutting_down)


def shutting_down() -> errors.NotReady:
    return errors.NotReady(
        "The server is shutting down; retry shortly (another replica may take the request).", retry_after=5
    )


def get_state(request: Request) -> AppState:
    return request.app.state.stepimage


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


class RequestContextMiddleware:
    """Gives every request an id (the client's x-request-id when sane), echoes it on every response,
    counts the request in metrics and logs one line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(label, str(status)).inc()
            logger.log(
                logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO,
                "request_id=%s method=%s path=%s status=%d ms=%.1f",
                request_id,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


class ShutdownAnswerMiddleware:
    """Answers a request that the HTTP server cancels while stopping with our 503 envelope.

    uvicorn cancels the requests still open when its shutdown grace ends (see server/cli.py); left alone, that
    is a CancelledError traceback in the log and a plain-text 500 for the client. Outside a shutdown a
    cancellation is not ours to answer and goes on.
    """

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            self.state.cut_short += 1
            if not started:
                response = error_response(shutting_down(), scope.get("state", {}).get("request_id", "-"))
                response.headers["connection"] = "close"
                await response(scope, receive, send)


# After `idle_timeout` seconds of grace, a body must average at least this pace. Without it, a client that sends a
# byte just under every `idle_timeout` seconds holds a request and a connection for as long as it likes (64 MiB at
# a byte per 29 s: decades), and a few hundred of them fill --max-connections. 16 KiB/s is a poor mobile link's pace;
# the largest default body (64 MiB) may take 68 minutes at it.
MIN_BODY_BYTES_PER_S = 16 * 1024


class BodyLimitMiddleware:
    """Refuses bodies over the configured size with 413, before or while they stream in, and answers 408 when a
    body stops arriving for `idle_timeout` seconds, or arrives slower on average than MIN_BODY_BYTES_PER_S once
    `idle_timeout` seconds have passed (a slow-body client holds a connection and a request)."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout

    def _too_large(self) -> errors.RequestTooLarge:
        limit_mb = self.max_bytes / (1024 * 1024)
        return errors.RequestTooLarge(f"The request body is larger than the server's limit of {limit_mb:g} MiB.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(self._too_large(), scope.get("state", {}).get("request_id", "-"))
            # The client may still be sending; tell it not to reuse this connection.
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        received = 0
        body_done = False
        body_started = time.monotonic()

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done or self.idle_timeout is None:
                # After the body, receive() only waits for the client to disconnect: no deadline there.
                message = await receive()
            else:
                elapsed = time.monotonic() - body_started
                # What the pace allows from here: the grace, plus the time the bytes so far earned at the minimum.
                paced = self.idle_timeout + received / MIN_BODY_BYTES_PER_S - elapsed
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout, paced)))
                except TimeoutError:
                    if paced >= self.idle_timeout:
                        raise errors.RequestTimeout(
                            "The request body stopped arriving: nothing was received for "
                            f"{self.idle_timeout:g} seconds."
                        ) from None
                    raise errors.RequestTimeout(
                        f"The request body arrived too slowly: {received} bytes in "
                        f"{time.monotonic() - body_started:.0f} seconds, under the server's minimum average of "
                        f"{MIN_BODY_BYTES_PER_S // 1024} KiB/s."
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)


def error_response(error: errors.ApiError, request_id: str) -> JSONResponse:
    mapped = errors.to_response(error)
    headers = {**mapped.headers, "x-request-id": request_id}
    return JSONResponse(mapped.body, status_code=mapped.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: errors.ApiError) -> JSONResponse:
        return error_response(exc, request_id_of(request))

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The method and path are the client's own text: bounded, so a 100 kB path is not echoed whole.
        method, path = request.method[:QUOTED_CHARS], quoted(request.url.path)
        if exc.status_code == 404:
            error: errors.ApiError = errors.NotFound(f"No route {method} {path}")
        elif exc.status_code == 405:
            error = errors.MethodNotAllowed(f"Method {method} is not allowed on {path}")
        else:
            error = errors.InvalidRequest(None, str(exc.detail))
            error.status = exc.status_code
        return error_response(error, request_id_of(request))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        param = location[0] if location else None
        return error_response(errors.InvalidRequest(param, first.get("msg", "invalid request")), request_id_of(request))

    async def on_client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up while still sending its body: nobody reads this answer; it is counted as a
        # cancellation (499), like a client that leaves while its image is made, not as a server error.
        request.app.state.stepimage.metrics.cancellations.inc()
        gone = ClientGone("The client closed the connection while sending its request.")
        return error_response(gone, request_id_of(request))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.exception("request_id=%s unexpected error", request_id)
        return error_response(errors.internal_error(request_id), request_id)

    app.add_exception_handler(errors.ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, on_client_disconnect)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)


BackendLoader = Callable[[Settings, str], Backend]


def create_app(
    settings: Settings,
    backend: Backend | list[Backend] | None = None,
    *,
    backend_loader: BackendLoader | None = None,
    exit_on_load_failure: bool = False,
    engine: ExternalEngine | None = None,
) -> FastAPI:
    """The app. `backend` (one, or one per device) skips loading; else `backend_loader(settings, device)`
    (default: the configured backend) loads one replica per configured device. `engine` replaces the
    local engine: nothing is loaded here, and requests, metrics and readiness go through it."""
    external = engine
    if external is not None and (backend is not None or backend_loader is not None):
        raise ValueError("an external engine brings its own models: pass no backend or backend_loader with it")
    metrics = external.metrics if external is not None else Metrics()
    engine = (
        external
        if external is not None
        else Engine(
            max_queue=settings.max_queue,
            request_timeout=settings.request_timeout,
            metrics=metrics,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
    )
    # Checked here, before any model work: a storage that cannot hold results is a start-up error.
    store = open_store(settings, metrics)
    state = AppState(
        settings=settings,
        engine=engine,
        store=store,
        metrics=metrics,
        service=ImageService(settings, engine, store, metrics),  # type: ignore[arg-type]
    )
    if not settings.api_keys:
        logger.warning("no API keys configured: this server accepts requests from anyone who can reach it")

    async def load(engine: Engine) -> None:
        try:
            from server.backends import warm_up_backend

            if backend is not None:
                given = backend if isinstance(backend, list) else [backend]
                replicas = [(getattr(b.info, "device", "cpu"), b) for b in given]
            else:
                from server.backends import load_backend, resolve_devices

                loader = backend_loader or load_backend
                devices = await engine.run_blocking(resolve_devices, settings)
                replicas = [(device, await engine.run_blocking(loader, settings, device)) for device in devices]
            if settings.warmup:
                for device, replica in replicas:
                    await engine.run_blocking(warm_up_backend, settings, device, replica)
            engine.start(replicas)
            state.loaded = True
            state.ready = True
            metrics.ready.set(1)
            for device, replica in replicas:
                info = replica.info
                logger.info("ready on %s: backend=%s model=%s dtype=%s", device, info.backend, info.model, info.dtype)
        except Exception as exc:  # a model that cannot load must say why, loudly
            state.load_error = str(exc)
            state.loaded = True
            logger.error("the model could not be loaded: %s", exc)
            if exit_on_load_failure:
                # The runner (server/cli.py) sees this and stops; a signal to ourselves would read as an
                # operator's shutdown in the log.
                state.stop_requested = True

    async def follow_readiness(external: ExternalEngine) -> None:
        """An external engine's models come and go (replicas start, fail, scale): follow them."""
        while not state.draining:
            ready = await external.ready()
            if not state.draining:
                state.ready = ready
                metrics.ready.set(1 if ready else 0)
            await asyncio.sleep(READINESS_POLL_SECONDS)

    async def every(seconds: float, work: Callable[[], object]) -> None:
        # Storage work may be a request to a bucket: off the event loop. Neither sweep nor check raises.
        while True:
            await asyncio.to_thread(work)
            await asyncio.sleep(seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(follow_readiness(external) if external is not None else load(engine))
        # The first sweep runs at once, without holding up start-up (a big bucket takes a while to list).
        sweeping = asyncio.create_task(every(settings.sweep_interval, store.sweep))
        watching = asyncio.create_task(every(settings.storage_check_interval, store.refresh_health))
        try:
            yield
        finally:
            state.begin_drain()
            sweeping.cancel()
            watching.cancel()
            if not loading.done():
                loading.cancel()
            await engine.drain(settings.drain_timeout)

    app = create_documented_app(
        settings,
        title="stepimage",
        description="Step Image Edit 2 image API on open weights",
        lifespan=lifespan,
    )
    app.state.stepimage = state
    _install_error_handlers(app)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(health.router)
    if settings.ui:
        app.include_router(ui.build_router())
    # Added last = outermost: the id exists before anything else runs, and the body limit applies to all.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, idle_timeout=settings.body_timeout)
    app.add_middleware(ShutdownAnswerMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
