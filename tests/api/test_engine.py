"""The engine under load: admission control, batching, deadlines, cancellation, several devices, metrics."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipelines.base import GenerationRequest
from server.engine import BatchCancel, ClientGone, Engine, Job
from server.errors import Overloaded, Timeout
from server.metrics import Metrics
from tests.api.conftest import SMALL, GatedBackend, GatedBatchingBackend, assert_error
from tests.conftest import assert_same_image_across_batches, metric, wait_for

pytestmark = pytest.mark.api

BODY = {"prompt": "a red kite", "size": SMALL, "steps": 2, "response_format": "b64_json"}


def post(client, headers=None, **fields):
    return client.post("/v1/images/generations", json={**BODY, **fields}, headers=headers or {})


def run_in_threads(calls):
    """Run callables at once; return their results in order."""
    results = [None] * len(calls)

    def run(index, call):
        results[index] = call()

    threads = [threading.Thread(target=run, args=(index, call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


# -- admission control ------------------------------------------------------------------------------------


def test_saturation_gives_429_with_retry_after_and_never_500(make_client, gated):
    client = make_client(backend=gated, max_queue=2, max_batch_size=1)
    gated.gate.clear()
    threads, results = run_in_threads([lambda seed=seed: post(client, seed=seed) for seed in range(8)])
    wait_for(lambda: metric(client, "stepimage_rejections_total") + 2 >= 8)
    gated.gate.set()
    for thread in threads:
        thread.join(60)
    statuses = sorted(response.status_code for response in results)
    assert statuses == [200, 200] + [429] * 6
    for response in results:
        if response.status_code == 429:
            error = assert_error(response, 429, None, "server_overloaded")
            assert error["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
    assert metric(client, "stepimage_rejections_total") == 6
    assert metric(client, "stepimage_queue_depth") == 0
    assert metric(client, "stepimage_in_flight") == 0


# -- batching ------------------------------------------------------------------------------------------------


def test_compatible_waiting_requests_run_as_one_batch_and_keep_their_pixels(make_client, tiny_backend):
    backend = GatedBatchingBackend(tiny_backend)
    client = make_client(backend=backend, max_batch_size=4)
    backend.gate.clear()
    # The first request occupies the worker; the next ones queue up behind it.
    first_thread, first = run_in_threads([lambda: post(client, seed=1)])
    assert backend.started.wait(10)
    calls = [
        lambda: post(client, seed=2, prompt="a blue kite"),
        lambda: post(client, seed=3, negative_prompt="ignored at cfg 1"),
        lambda: post(client, seed=4, n=2),
        lambda: post(client, seed=5, steps=3),  # another step count: another batch
    ]
    threads, results = run_in_threads(calls)
    wait_for(lambda: metric(client, "stepimage_queue_depth") == 4)
    backend.gate.set()
    for thread in first_thread + threads:
        thread.join(60)
    assert all(response.status_code == 200 for response in first + results)
    sizes = sorted(sum(request.n for request in batch) for batch in backend.batches)
    # 1 (the first) + 4 images (seeds 2, 3, 4+5 as n=2) in one call + the odd one out alone.
    assert sizes == [1, 1, 4]
    batched = next(batch for batch in backend.batches if len(batch) == 3)
    assert sorted(request.seed for request in batched) == [2, 3, 4]
    # Batch invariance: each request's image is (within float rounding) what it gets alone.
    for response, fields in zip(results[:3], ({"seed": 2, "prompt": "a blue kite"}, {"seed": 3}, {"seed": 4})):
        alone = post(client, **fields).json()["data"][0]["b64_json"]
        assert_same_image_across_batches(response.json()["data"][0]["b64_json"], alone)
    assert metric(client, "stepimage_batch_size_count") >= 3


def test_edits_batch_too(make_client, tiny_backend):
    from tests.conftest import image_bytes

    backend = GatedBatchingBackend(tiny_backend)
    client = make_client(backend=backend, max_batch_size=4)
    backend.gate.clear()

    def edit(seed, width):
        files = {"image": ("in.png", image_bytes(width, 64, seed=seed), "image/png")}
        data = {"prompt": f"edit {seed}", "steps": "2", "seed": str(seed), "response_format": "b64_json"}
        return client.post("/v1/images/edits", data=data, files=files)

    first_thread, _ = run_in_threads([lambda: edit(1, 64)])
    assert backend.started.wait(10)
    # Two inputs of one working size (96x64) and different pixels, one of another size.
    threads, results = run_in_threads([lambda: edit(2, 96), lambda: edit(3, 96), lambda: edit(4, 128)])
    wait_for(lambda: metric(client, "stepimage_queue_depth") == 3)
    backend.gate.set()
    for thread in first_thread + threads:
        thread.join(60)
    # The first edit alone, then the two 96-wide inputs together and the 128-wide one alone (in arrival order).
    assert sorted(len(batch) for batch in backend.batches) == [1, 1, 2]
    pair = next(batch for batch in backend.batches if len(batch) == 2)
    assert sorted(request.seed for request in pair) == [2, 3]
    for response, (seed, width) in zip(results, ((2, 96), (3, 96), (4, 128))):
        alone = edit(seed, width)
        assert_same_image_across_batches(response.json()["data"][0]["b64_json"], alone.json()["data"][0]["b64_json"])


# -- deadlines and cancellation --------------------------------------------------------------------------


def test_client_can_ask_for_a_shorter_deadline(make_client, gated):
    client = make_client(backend=gated, request_timeout=300)
    gated.gate.clear()
    assert_error(post(client, headers={"x-request-timeout": "0.2"}), 504, None, "timeout")
    assert metric(client, "stepimage_timeouts_total") == 1
    for bad in ("soon", "0", "-1", "inf"):
        assert_error(post(client, headers={"x-request-timeout": bad}), 400, "x-request-timeout")
    gated.gate.set()
    assert post(client).status_code == 200


def counting_passes(backend, seconds_per_pass: float = 0.0):
    """Count transformer forward passes of the real tiny pipeline, optionally making each one slower."""
    import time

    passes = []

    def hook(*args):
        passes.append(1)
        time.sleep(seconds_per_pass)

    handle = backend.pipe.transformer.register_forward_hook(hook)
    return passes, handle


async def _submit(engine, request, **kwargs):
    return await engine.submit(request, **kwargs)


def make_engine(backends, **overrides) -> Engine:
    options = dict(max_queue=8, request_timeout=60, metrics=Metrics(), max_batch_size=4)
    options.update(overrides)
    engine = Engine(**options)
    engine.start([(f"device-{index}", backend) for index, backend in enumerate(backends)])
    return engine


def test_a_disconnected_client_stops_its_job_and_the_next_one_runs(tiny_backend):
    # 40 steps of at least 30 ms: far longer than the 50 ms between the engine's disconnect checks.
    passes, handle = counting_passes(tiny_backend, seconds_per_pass=0.03)
    steps = 40

    async def scenario():
        engine = make_engine([tiny_backend])
        long_request = GenerationRequest(prompt="abandoned", seed=1, steps=steps, height=64, width=64)

        async def gone_after_two_steps() -> bool:
            return len(passes) >= 2

        with pytest.raises(ClientGone):
            await engine.submit(long_request, disconnected=gone_after_two_steps)
        await engine.wait_idle(30)
        stopped_at = len(passes)
        follow_up = await engine.submit(GenerationRequest(prompt="next", seed=2, steps=2, height=64, width=64))
        await engine.drain(5)
        return stopped_at, follow_up, engine

    try:
        stopped_at, follow_up, engine = asyncio.run(scenario())
    finally:
        handle.remove()
    # Stopped within a few steps of the client leaving, far short of the 40 it asked for.
    assert 2 <= stopped_at < steps
    assert follow_up.result.images[0].size == (64, 64)
    assert engine.metrics.cancellations._value.get() == 1


def small_request(prompt: str, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=1, height=64, width=64)


async def engine_held_busy(gated: GatedBackend, **overrides):
    """An engine whose only worker is running a first request, held at the gate; returns (engine, that task)."""
    engine = make_engine([gated], **{"max_batch_size": 1, **overrides})
    gated.gate.clear()
    blocker = asyncio.create_task(engine.submit(small_request("first", 1)))
    while not gated.started.is_set():
        await asyncio.sleep(0.01)
    return engine, blocker


def test_a_batch_tells_the_pipeline_which_of_its_requests_are_gone():
    jobs = [Job(request=small_request(prompt, seed), key="same", future=None) for seed, prompt in enumerate("ab")]
    cancel = BatchCancel(jobs)
    jobs[0].cancelled = True
    # The batch runs on for the second request; the first gets no more previews (see _DenoisingLoop.after_step).
    assert (cancel.is_set(), cancel.request_cancelled(0), cancel.request_cancelled(1)) == (False, True, False)
    jobs[1].cancelled = True
    assert cancel.is_set()


def test_a_client_that_leaves_while_queued_never_reaches_the_gpu(tiny_backend):
    gated = GatedBackend(tiny_backend)

    async def scenario():
        engine, blocker = await engine_held_busy(gated)
        left = asyncio.Event()

        async def disconnected() -> bool:
            return left.is_set()

        waiting = asyncio.create_task(engine.submit(small_request("leaves", 2), disconnected=disconnected))
        await asyncio.sleep(0.1)
        assert engine.queued == 1
        left.set()
        with pytest.raises(ClientGone):
            await waiting
        assert engine.queued == 0
        gated.gate.set()
        await blocker
        await engine.drain(5)

    asyncio.run(scenario())
    assert [request.prompt for request in gated.requests] == ["first"]


def test_a_timed_out_request_leaves_the_queue_and_others_are_unaffected(tiny_backend):
    gated = GatedBackend(tiny_backend)

    async def scenario():
        engine, blocker = await engine_held_busy(gated)
        patient = asyncio.create_task(engine.submit(small_request("patient", 3)))
        with pytest.raises(Timeout):
            await engine.submit(small_request("hurried", 2), timeout=0.1)
        gated.gate.set()
        results = await asyncio.gather(blocker, patient)
        await engine.drain(5)
        return results

    results = asyncio.run(scenario())
    assert all(result.result.images[0].size == (64, 64) for result in results)
    assert [request.prompt for request in gated.requests] == ["first", "patient"]


def test_full_queue_is_refused_at_once(tiny_backend):
    gated = GatedBackend(tiny_backend)

    async def scenario():
        engine, blocker = await engine_held_busy(gated, max_queue=1)
        with pytest.raises(Overloaded) as refused:
            await engine.submit(small_request("second", 2))
        gated.gate.set()
        await blocker
        await engine.drain(5)
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.retry_after >= 1


# -- several devices ------------------------------------------------------------------------------------------


def test_each_device_takes_work_from_the_shared_queue(make_client, tiny_backend):
    from pipelines.flux2_klein import RunOptions
    from pipelines.tiny import load_tiny_backend

    # One replica per device, as the server loads them: a pipeline is never shared between workers.
    first, second = GatedBackend(tiny_backend), GatedBackend(load_tiny_backend(RunOptions()))
    client = make_client(backend=[first, second], max_batch_size=1)
    first.gate.clear()
    second.gate.clear()
    threads, results = run_in_threads([lambda: post(client, seed=1), lambda: post(client, seed=2)])
    # Both devices are busy at the same time: the second request did not wait for the first.
    assert first.started.wait(10) and second.started.wait(10)
    assert metric(client, "stepimage_in_flight") == 2
    first.gate.set()
    second.gate.set()
    for thread in threads:
        thread.join(60)
    assert [response.status_code for response in results] == [200, 200]


# -- drain --------------------------------------------------------------------------------------------------


def test_drain_finishes_accepted_work_and_refuses_new_work(make_client, gated):
    client = make_client(backend=gated)
    gated.gate.clear()
    threads, results = run_in_threads([lambda: post(client, seed=1)])
    assert gated.started.wait(10)
    state = client.app.state.stepimage
    drained = threading.Event()

    def drain():
        client.portal.call(state.drain)
        drained.set()

    drainer = threading.Thread(target=drain)
    drainer.start()
    wait_for(lambda: state.draining)
    assert_error(client.get("/ready"), 503, None, "not_ready")
    refused = post(client, seed=2)
    assert_error(refused, 503, None, "not_ready")
    assert refused.headers["retry-after"]
    assert not drained.is_set()
    gated.gate.set()
    drainer.join(30)
    threads[0].join(30)
    assert drained.is_set()
    assert results[0].status_code == 200


def test_a_short_wait_lets_a_lone_request_gather_company(tiny_backend):
    backend = GatedBatchingBackend(tiny_backend)

    async def scenario():
        engine = make_engine([backend], batch_wait_ms=300)
        first = asyncio.create_task(engine.submit(small_request("first", 1)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(engine.submit(small_request("second", 2)))
        results = await asyncio.gather(first, second)
        await engine.drain(5)
        return results

    results = asyncio.run(scenario())
    # Both arrived inside the window, so one pipeline call made both images.
    assert [len(batch) for batch in backend.batches] == [2]
    assert [result.batch_images for result in results] == [2, 2]
