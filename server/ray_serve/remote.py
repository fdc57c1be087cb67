"""`RemoteEngine`: the engine the ingress's app serves through, backed by the model replicas.

It has the local Engine's interface (`submit(request, *, timeout, disconnected, on_partial, encoding)`, drain,
outstanding) so `create_app` and `ImageService` run unchanged, but each request goes over a Serve
handle to a model replica, whose own Engine queues, batches and runs it. The call is a stream: the
replica yields each preview, then the result (or the API error it met), so streamed partial images
and plain responses take the same path.

What it keeps of the contract across processes and hosts:
- **Admission**: a model replica takes at most `max_queue` requests (Serve's `max_ongoing_requests`);
  when all are full a request waits at this ingress's router, up to `router_queue` of them. The bound
  is kept here, exactly, as in one process: an ingress replica holds at most its share of the running
  model replicas' `max_queue`s plus `router_queue`, and the next request gets our 429
  `server_overloaded` at once, with a Retry-After from the measured seconds per image. Serve's own
  bound (`max_queued_requests`, its back-pressure error) is only a backstop: it counts a request as
  queued while the request picks a replica, so a burst arriving together passes it together (11 of
  8 accepted in the Ray tests on the busy 2-core machine) or is refused while replicas have room.
- **Deadlines and disconnects**: when the client goes away or its deadline passes, the stream is
  cancelled; Serve cancels the replica's handler, whose Engine drops the job from its queue or stops
  its batch at the next denoising step (the replica also gets the remaining deadline, in case the
  cancellation itself is lost).
- **Replica faults**: a replica that dies while holding a request (a crash, a lost host, `ray.kill`)
  or becomes unreachable does not lose it: the call to it is cancelled and the request is sent again,
  to another replica, up to `retries` times within its deadline. Previews already passed on are not
  repeated.
- **Readiness**: ready while at least one model replica is running (loaded and warm), as Serve's
  controller reports it; while none is, requests get 503 `not_ready` at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from PIL import Image
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from pipelines.base import BackendInfo, GenerationRequest
from server.engine import ClientGone, Encoding, EngineResult
from server.errors import ApiError, NotReady, Overloaded, Timeout
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# The model replica's streaming method, called through the handle.
RUN_METHOD = "run"
# What the model itself took, of the stages a result reports: the basis of Retry-After.
PIPELINE_STAGES = ("encode_prompt", "denoise", "decode")
# How long a readiness check waits for a replica to describe its model.
DESCRIBE_TIMEOUT_S = 5.0


# -- images between processes ----------------------------------------------------------------------------

# Images cross between processes as numpy arrays, which Ray passes out of band through its object store,
# rather than as PIL's own pickle (its raw bytes, in band): returning a 1024x1024 RGB image over a Serve
# handle cost 9.6 ms more than an empty reply as a PIL image, 5.0 ms as an array (measured on the 2-core
# development machine, busy). Other modes keep PIL's own state (palette included).
_ARRAY_MODES = frozenset({"RGB", "RGBA", "L"})


def _image_payload(image: Image.Image) -> tuple[str, Any]:
    if image.mode in _ARRAY_MODES:
        return image.mode, np.asarray(image)
    return image.mode, image.__getstate__()


def _image_from_payload(payload: tuple[str, Any]) -> Image.Image:
    mode, data = payload
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data)
        return image if image.mode == mode else image.convert(mode)
    image = Image.Image.__new__(Image.Image)
    image.__setstate__(data)
    return image


def send_images_as_arrays() -> None:
    """Make this process send PIL images as arrays (call it in every process that sends images)."""
    ray.util.register_serializer(Image.Image, serializer=_image_payload, deserializer=_image_from_payload)


# -- what a model replica streams back -------------------------------------------------------------


@dataclass(frozen=True)
class Preview:
    """One partial image set (`pipelines.base.PartialImages`) on its way."""

    partial: Any


@dataclass(frozen=True)
class Done:
    outcome: EngineResult
    replica: str


@dataclass(frozen=True)
class Refused:
    """An API error met on the replica (queue full, deadline, shutting down), as plain values: the
    exception classes take different constructor arguments and would not all survive pickling."""

    status: int
    type: str
    code: str
    message: str
    param: str | None
    retry_after: int | None

    @classmethod
    def of(cls, error: ApiError) -> Refused:
        return cls(error.status, error.type, error.code, error.message, error.param, error.retry_after)

    def rebuild(self) -> ApiError:
        error = ApiError(self.message, param=self.param, retry_after=self.retry_after)
        error.status, error.type, error.code = self.status, self.type, self.code
        return error


@dataclass(frozen=True)
class Crashed:
    """Anything else that failed on the replica; its log has the details, the client gets a 500."""

    replica: str


class ModelReplicaFailed(Exception):
    """No model replica could produce this request's images (logged; the client sees a plain 500)."""


@dataclass(frozen=True)
class RemoteBackend:
    """What /v1/models describes: the model the replicas serve."""

    info: BackendInfo


async def _until_disconnected(disconnected: Callable[[], Awaitable[bool]]) -> None:
    from server.engine import DISCONNECT_POLL_SECONDS

    while not await disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _cancel(stream: Any) -> None:
    """Cancel a call to a model replica, best effort: a replica that is gone has nothing left to stop."""
    try:
        stream.cancel()
    except Exception as exc:  # noqa: BLE001 - the call is abandoned either way
        logger.debug("could not cancel a call to a model replica: %s", exc)


class RemoteEngine:
    def __init__(
        self,
        handle: DeploymentHandle,
        *,
        request_timeout: float,
        per_replica: int,
        router_queue: int,
        retries: int = 2,
        ingress: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.request_timeout = request_timeout
        self.per_replica = per_replica
        self.router_queue = router_queue
        self.retries = retries
        # This ingress's deployment, whose replicas share the model replicas (None: this one alone).
        self._ingress = ingress
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._accepting = True
        self._outstanding_requests = 0
        self._outstanding_images = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Calls to model replicas under way; fail_all answers them with its error instead of their result.
        self._calls: set[asyncio.Task] = set()
        self._failed: dict[asyncio.Task, Callable[[], ApiError]] = {}
        # Running model and ingress replicas at the last look, and the seconds per image the model replicas
        # take (moving average; the first guess only shapes the first Retry-After).
        self._replicas = 0
        self._ingress_replicas = 1
        self._seconds_per_image = 2.0
        self._info: BackendInfo | None = None
        self.replica_requests = Counter(
            "stepimage_model_replica_requests",
            "Image requests answered, by the model replica that ran them (Ray Serve).",
            ["replica"],
            registry=self.metrics.registry,
        )
        self.replica_retries = Counter(
            "stepimage_model_replica_retries",
            "Requests sent again to another model replica because theirs died (Ray Serve).",
            registry=self.metrics.registry,
        )

    # -- the Engine interface the app uses ---------------------------------------------------------

    @property
    def backend(self) -> RemoteBackend | None:
        return RemoteBackend(self._info) if self._info is not None else None

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def outstanding(self) -> int:
        """Requests sent to model replicas and not answered yet (queued or running there)."""
        return self._outstanding_requests

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and give the ones at model replicas `timeout` seconds; no worker runs here."""
        self.stop_accepting()
        await self.wait_idle(timeout)

    async def submit(
        self,
        request: GenerationRequest,
        *,
        timeout: float | None = None,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        on_partial: Callable[[Any], None] | None = None,
        encoding: Encoding | None = None,
    ) -> EngineResult:
        if not self._accepting:
            raise NotReady("The server is shutting down; retry shortly.", retry_after=5)
        if not self._replicas:
            # Starting, or every replica failed: as the local Engine while its model loads, 503 at once, rather than
            # a wait at Serve's router until the deadline. min_model_replicas >= 1: no scale-from-zero to wait for.
            raise NotReady("No model replica is running yet; retry shortly.", retry_after=5)
        if self._outstanding_requests >= self.admission_limit:
            self.metrics.rejections.inc()
            raise Overloaded(
                f"The server is at capacity ({self._outstanding_requests} requests queued or running); retry later.",
                retry_after=self._retry_after(),
            )
        limit = self.request_timeout if timeout is None else min(timeout, self.request_timeout)
        self._count(request, +1)
        call = asyncio.create_task(self._call(request, limit, on_partial, encoding))
        self._calls.add(call)
        gone = asyncio.create_task(_until_disconnected(disconnected)) if disconnected is not None else None
        try:
            done, _ = await asyncio.wait({call, gone} - {None}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if call in self._failed:
                raise self._failed[call]()
            if call in done:
                return call.result()
            if gone in done:
                self.metrics.cancellations.inc()
                raise ClientGone("The client closed the connection.")
            self.metrics.timeouts.inc()
            raise Timeout(f"The request did not finish within {limit:g} seconds.")
        except asyncio.CancelledError:
            # Serve's proxy cancels the ingress's handler when the client disconnects: counted here. A streamed
            # request's probe (one with `claim`, see server/serving.py) says its event stream counts the client's
            # leaving itself, and that the stream may cancel this call for other reasons (a preview it could not
            # send), which are no client's cancellation.
            if getattr(disconnected, "claim", None) is None:
                self.metrics.cancellations.inc()
            raise
        finally:
            # Whatever ends the wait (result, deadline, client gone, or this task being cancelled because
            # Serve saw the client go), the replica's job must not run on for nobody.
            for task in (call, gone):
                if task is not None and not task.done():
                    task.cancel()
            self._calls.discard(call)
            self._failed.pop(call, None)
            self._count(request, -1)

    async def fail_all(self, error: Callable[[], ApiError]) -> int:
        """Answer every request under way with `error()` now and cancel its job on its replica (a shutdown that
        cannot wait). Returns how many were answered."""
        answered = 0
        for call in list(self._calls):
            if not call.done() and call not in self._failed:
                self._failed[call] = error
                call.cancel()
                answered += 1
        return answered

    async def ready(self) -> bool:
        """Whether at least one model replica is running; also learns what model they serve."""
        try:
            self._replicas, self._ingress_replicas = await asyncio.to_thread(self._running_replicas)
        except Exception as exc:  # noqa: BLE001 - the controller may be restarting; keep the last answer
            logger.warning("could not read the model replicas' status from Serve: %s", exc)
        if self._replicas and self._info is None:
            try:
                self._info = await asyncio.wait_for(self._handle.describe.remote(), DESCRIBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - /v1/models lacks the details until a later look
                logger.info("the model replicas could not describe their model yet: %s", exc)
        return self._replicas > 0

    # -- internals ---------------------------------------------------------------------------------

    def _count(self, request: GenerationRequest, sign: int) -> None:
        self._outstanding_requests += sign
        self._outstanding_images += sign * request.n
        self.metrics.in_flight.set(self._outstanding_requests)
        if self._outstanding_requests:
            self._idle.clear()
        else:
            self._idle.set()

    @property
    def admission_limit(self) -> int:
        """Requests this ingress replica holds at most: its share of what the running model replicas take, plus
        what may wait at its router."""
        share = math.ceil(self._replicas * self.per_replica / max(1, self._ingress_replicas))
        return share + self.router_queue

    def _running_replicas(self) -> tuple[int, int]:
        """Running replicas of the model deployment, and of this ingress's deployment (at least this one)."""
        status = serve.status()
        application = status.applications.get(self._handle.app_name)
        deployments = application.deployments if application else {}

        def running(name: str | None) -> int:
            deployment = deployments.get(name) if name else None
            return deployment.replica_states.get("RUNNING", 0) if deployment else 0

        return running(self._handle.deployment_name), max(1, running(self._ingress))

    def _retry_after(self) -> int:
        """Seconds until the work this ingress replica holds is done, on its share of the model replicas."""
        share = max(1, self._replicas) / self._ingress_replicas
        return max(1, math.ceil(self._outstanding_images * self._seconds_per_image / share))

    def _learn(self, done: Done, request: GenerationRequest) -> None:
        self.replica_requests.labels(done.replica).inc()
        timings = done.outcome.result.timings_ms
        pipeline_ms = sum(timings.get(stage, 0.0) for stage in PIPELINE_STAGES)
        if pipeline_ms > 0:
            per_image = pipeline_ms / 1000 / max(1, request.n)
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image

    async def _call(
        self,
        request: GenerationRequest,
        limit: float,
        on_partial: Callable[[Any], None] | None,
        encoding: Encoding | None,
    ) -> EngineResult:
        deadline = time.monotonic() + limit
        shown = -1  # the highest preview index passed on, so that a resent request repeats none
        attempt = 0
        while True:
            remaining = max(0.001, deadline - time.monotonic())
            stream = getattr(self._stream, RUN_METHOD).remote(request, remaining, on_partial is not None, encoding)
            finished = False
            try:
                async for message in stream:
                    if isinstance(message, Preview):
                        if on_partial is not None and message.partial.index > shown:
                            shown = message.partial.index
                            on_partial(message.partial)
                        continue
                    finished = True
                    if isinstance(message, Done):
                        self._learn(message, request)
                        return message.outcome
                    if isinstance(message, Refused):
                        raise self._refused(message)
                    raise ModelReplicaFailed(f"model replica {message.replica} failed; see its log")
                finished = True
                raise ModelReplicaFailed("the model replica ended the call without a result")
            except BackPressureError:  # the backstop (see the module's docstring)
                finished = True
                self.metrics.rejections.inc()
                raise Overloaded(
                    "Every model replica is at capacity; retry later.", retry_after=self._retry_after()
                ) from None
            except DeploymentUnavailableError:
                finished = True
                raise NotReady("No model replica is available; retry shortly.", retry_after=5) from None
            except RayActorError as exc:
                # The replica died, or became unreachable holding this request (ActorUnavailableError, a subclass:
                # a network blip, after which the call may still be running there). Serve takes it out of rotation,
                # so sending the request again reaches another replica; `finally` cancels this call first, so that
                # a replica still running it does not do the work twice, for nobody, outside this ingress's count.
                if attempt >= self.retries:
                    raise ModelReplicaFailed(f"the model replica stopped {attempt + 1} time(s): {exc}") from None
                attempt += 1
                self.replica_retries.inc()
                logger.warning("a model replica stopped while running a request; sending it again (%d)", attempt)
            finally:
                if not finished:
                    _cancel(stream)

    def _refused(self, refused: Refused) -> ApiError:
        error = refused.rebuild()
        if error.code == Overloaded.code:
            self.metrics.rejections.inc()
        elif error.code == Timeout.code:
            self.metrics.timeouts.inc()
        return error
