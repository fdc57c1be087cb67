"""RemoteEngine's own bookkeeping, in one event loop, with a stand-in for the Serve handle: the admission bound it
keeps, Retry-After, fail_all, and previews that a resent request does not repeat. tests/ray runs it against real
model replicas over a real handle; this pins down the arithmetic those tests cannot reach cheaply.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from pipelines.base import GenerationRequest, GenerationResult, PartialImages  # noqa: E402
from server.engine import EngineResult  # noqa: E402
from server.errors import NotReady, Overloaded  # noqa: E402
from server.ray_serve.remote import Done, Preview, RemoteEngine  # noqa: E402

pytestmark = pytest.mark.api


class Stream:
    """What `handle.options(stream=True).run.remote(...)` returns: an async iterator of the replica's messages."""

    def __init__(self, messages, hold: asyncio.Event | None, die_after: int | None, fault=ActorDiedError) -> None:
        self.messages = list(messages)
        self.hold = hold
        self.die_after = die_after
        self.fault = fault  # what the call raises when its replica is lost
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.die_after is not None and self.die_after == 0:
            raise self.fault()
        if self.hold is not None and len(self.messages) <= 1:
            await self.hold.wait()  # the result waits for the test
        if not self.messages:
            raise StopAsyncIteration
        if self.die_after is not None:
            self.die_after -= 1
        return self.messages.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A stand-in for the model deployment's handle; each call takes the next planned stream."""

    app_name = "app"
    deployment_name = "StepImageModel"

    def __init__(self) -> None:
        self.plans: list[dict] = []
        self.streams: list[Stream] = []
        self.encodings: list = []
        self.run = self

    def options(self, **_):
        return self

    def remote(self, request, timeout, previews, encoding=None):
        self.encodings.append(encoding)
        stream = Stream(**self.plans.pop(0))
        self.streams.append(stream)
        return stream


def outcome(request: GenerationRequest, denoise_ms: float = 1000.0) -> EngineResult:
    result = GenerationResult(images=[], seeds=request.seeds, timings_ms={"denoise": denoise_ms})
    return EngineResult(result=result, queue_ms=0.0, batch_images=1, device="cpu")


def engine(handle: Handle, replicas: int = 2, per_replica: int = 2, router_queue: int = 1) -> RemoteEngine:
    remote = RemoteEngine(handle, request_timeout=30, per_replica=per_replica, router_queue=router_queue)
    remote._replicas = replicas  # what ready() last read from Serve
    return remote


REQUEST = GenerationRequest(prompt="a kite", seed=1)


def test_the_ingress_holds_its_share_of_the_replicas_plus_the_router_queue_then_refuses():
    async def scenario():
        handle, hold = Handle(), asyncio.Event()
        remote = engine(handle, replicas=2, per_replica=2, router_queue=1)
        assert remote.admission_limit == 5
        handle.plans = [{"messages": [Done(outcome(REQUEST), "r1")], "hold": hold, "die_after": None}] * 5
        held = [asyncio.create_task(remote.submit(REQUEST)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert remote.outstanding == 5
        with pytest.raises(Overloaded) as refused:
            await remote.submit(REQUEST)
        # Five images ahead at 2 s each (the first guess), on two replicas.
        assert refused.value.retry_after == 5
        assert remote.metrics.rejections._value.get() == 1
        hold.set()
        await asyncio.gather(*held)
        assert remote.outstanding == 0
        # Learned from the answers: 1 s per image now (moving average from 2 s).
        assert remote._seconds_per_image < 2.0
        remote._ingress_replicas = 2  # a second ingress replica shares the model replicas
        assert remote.admission_limit == 3

    asyncio.run(scenario())


def test_with_no_model_replica_running_a_request_gets_503_at_once_and_reaches_no_replica():
    async def scenario():
        handle = Handle()
        remote = engine(handle, replicas=0)  # starting, or every replica failed
        with pytest.raises(NotReady) as refused:
            await remote.submit(REQUEST)
        assert (refused.value.status, refused.value.retry_after) == (503, 5)
        assert handle.streams == [] and remote.outstanding == 0
        remote._replicas = 1  # a replica came up
        handle.plans = [{"messages": [Done(outcome(REQUEST), "r1")], "hold": None, "die_after": None}]
        assert (await remote.submit(REQUEST)).result.seeds == [1]

    asyncio.run(scenario())


def test_fail_all_answers_every_request_under_way_and_cancels_its_stream():
    async def scenario():
        handle, hold = Handle(), asyncio.Event()
        remote = engine(handle)
        handle.plans = [{"messages": [Done(outcome(REQUEST), "r1")], "hold": hold, "die_after": None}] * 2
        held = [asyncio.create_task(remote.submit(REQUEST)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert await remote.fail_all(lambda: NotReady("stopping", retry_after=5)) == 2
        for task in held:
            with pytest.raises(NotReady):
                await task
        assert all(stream.cancelled for stream in handle.streams)
        assert remote.outstanding == 0

    asyncio.run(scenario())


def test_a_request_whose_replica_died_is_resent_without_repeating_a_preview():
    async def scenario():
        handle = Handle()
        remote = engine(handle)
        preview = [Preview(PartialImages(index=0, images=[]))]
        second = [Preview(PartialImages(index=1, images=[]))]
        handle.plans = [
            {"messages": preview + second, "hold": None, "die_after": 1},  # dies after its first preview
            {"messages": preview + second + [Done(outcome(REQUEST), "r2")], "hold": None, "die_after": None},
        ]
        seen = []
        answer = await remote.submit(REQUEST, on_partial=lambda partial: seen.append(partial.index))
        assert answer.result.seeds == [1]
        assert seen == [0, 1]
        assert remote.replica_retries._value.get() == 1
        assert remote.replica_requests.labels("r2")._value.get() == 1

    asyncio.run(scenario())


def test_a_call_whose_replica_became_unreachable_is_cancelled_before_the_request_is_resent():
    """ActorUnavailableError (a network blip) leaves the first call possibly running on its replica: it is cancelled,
    so the image is not made twice, once for nobody."""

    async def scenario():
        handle = Handle()
        remote = engine(handle)
        unreachable = {"fault": lambda: ActorUnavailableError("the replica is unreachable", None)}
        handle.plans = [
            {"messages": [], "hold": None, "die_after": 0, **unreachable},
            {"messages": [Done(outcome(REQUEST), "r2")], "hold": None, "die_after": None},
        ]
        answer = await remote.submit(REQUEST)
        assert answer.result.seeds == [1]
        first, second = handle.streams
        assert first.cancelled and not second.cancelled
        assert remote.replica_retries._value.get() == 1

    asyncio.run(scenario())


def test_the_result_travels_encoded_as_the_client_asked():
    """The replica encodes where the pixels are, so bytes, not megabytes of pixels, cross to the ingress."""
    import io

    from PIL import Image

    from server.engine import Encoding, encode_outcome

    request = GenerationRequest(prompt="x", seed=1, height=64, width=96)
    made = EngineResult(
        result=GenerationResult(
            images=[Image.new("RGB", (96, 64), (10, 200, 30))], seeds=[1], timings_ms={"denoise": 5.0}
        ),
        queue_ms=0.0,
        batch_images=1,
        device="cpu",
    )
    sent = encode_outcome(made, Encoding("jpeg", 80))
    assert sent.result.images == [] and len(sent.encoded) == 1
    picture = Image.open(io.BytesIO(sent.encoded[0]))
    assert (picture.format, picture.size) == ("JPEG", (96, 64))
    assert sent.result.timings_ms["encode_image"] >= 0 and sent.result.timings_ms["denoise"] == 5.0

    async def scenario():
        handle = Handle()
        handle.plans.append({"messages": [Done(sent, "replica-1")], "hold": None, "die_after": None})
        engine = RemoteEngine(handle, request_timeout=10, per_replica=2, router_queue=0)
        engine._replicas = 1
        outcome = await engine.submit(request, encoding=Encoding("jpeg", 80))
        return handle, outcome

    handle, outcome = asyncio.run(scenario())
    assert handle.encodings == [Encoding("jpeg", 80)]
    assert outcome.encoded == sent.encoded


def test_a_model_replica_call_cancelled_while_waiting_leaves_no_task_behind():
    """Serve cancels the replica's generator when the caller goes away; the job and the wait for its next preview
    both stop (a wait left pending is destroyed later with "Task was destroyed but it is pending!")."""
    from server.ray_serve.app import StepImageModel

    class Engine:
        """Holds the job until it is cancelled, as a job waiting in a full queue does."""

        def __init__(self) -> None:
            self.cancelled = asyncio.Event()

        async def submit(self, request, *, timeout, on_partial=None):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

    async def scenario():
        class Replica(StepImageModel.func_or_class):
            def __init__(self) -> None:  # the model's run() alone, over the engine above
                self.engine, self.replica = Engine(), "r1"

            def __del__(self) -> None:  # Serve awaits the real one at shutdown; there is nothing to drain here
                pass

        model = Replica()

        async def consume():
            async for _ in model.run(REQUEST, 30.0, True):
                pass

        caller = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)
        assert model.engine.cancelled.is_set()
        assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []

    asyncio.run(scenario())


def test_a_cancelled_call_is_counted_once_whether_a_plain_request_or_a_stream_whose_event_stream_counts_it():
    from server.serving import _ClientProbe

    async def still_there() -> bool:
        return False

    async def cancelled_count(disconnected) -> float:
        handle, hold = Handle(), asyncio.Event()
        remote = engine(handle)
        handle.plans = [{"messages": [Done(outcome(REQUEST), "r1")], "hold": hold, "die_after": None}]
        task = asyncio.create_task(remote.submit(REQUEST, disconnected=disconnected))
        await asyncio.sleep(0.05)
        if isinstance(disconnected, _ClientProbe):
            assert disconnected.claim()  # the event stream saw its client leave and counted it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert handle.streams[0].cancelled and remote.outstanding == 0
        return remote.metrics.cancellations._value.get()

    # Serve's proxy cancels the handler of a plain request whose client left: the engine counts it.
    assert asyncio.run(cancelled_count(still_there)) == 1
    # A streamed request: its event stream counted the leaving; the engine does not count it again.
    assert asyncio.run(cancelled_count(_ClientProbe(still_there))) == 0
