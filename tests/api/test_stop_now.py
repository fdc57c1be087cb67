"""Stopping without waiting, in-process: the engine answers every queued and running request and stops the work; the
app's drain does the same for what the drain timeout leaves; a body that stops arriving gets 408.

The signals and exit statuses around these are tested on a real process in tests/e2e/test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipelines.base import GenerationRequest
from server.engine import Engine
from server.errors import NotReady
from server.metrics import Metrics
from tests.api.conftest import SMALL, GatedBackend, assert_error
from tests.conftest import wait_for

pytestmark = pytest.mark.api


def small(prompt: str, seed: int) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=1, height=64, width=64)


def test_fail_all_answers_queued_and_running_requests_and_stops_the_running_work(tiny_backend):
    gated = GatedBackend(tiny_backend)

    async def scenario():
        engine = Engine(max_queue=8, request_timeout=60, metrics=Metrics(), max_batch_size=1)
        engine.start([("device-0", gated)])
        gated.gate.clear()
        running = asyncio.create_task(engine.submit(small("running", 1)))
        while not gated.started.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(engine.submit(small("queued", 2)))
        while engine.queued != 1:
            await asyncio.sleep(0.01)
        answered = await engine.fail_all(lambda: NotReady("stopping", retry_after=5))
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        # The gate never opens: the running job leaves it only because its cancel flag is set.
        assert await engine.wait_idle(30)
        await engine.drain(5)
        return answered, outcomes, engine

    answered, outcomes, engine = asyncio.run(scenario())
    assert answered == 2
    assert all(isinstance(outcome, NotReady) and outcome.retry_after == 5 for outcome in outcomes), outcomes
    # Each request got its own exception object (one raised in two places would chain tracebacks).
    assert outcomes[0] is not outcomes[1]
    assert [request.prompt for request in gated.requests] == ["running"]
    assert engine.outstanding == 0
    assert engine.metrics.queue_depth._value.get() == 0


def test_fail_all_on_an_idle_engine_answers_nothing(tiny_backend):
    async def scenario():
        engine = Engine(max_queue=8, request_timeout=60, metrics=Metrics())
        engine.start([("device-0", tiny_backend)])
        answered = await engine.fail_all(lambda: NotReady("stopping"))
        await engine.drain(5)
        return answered

    assert asyncio.run(scenario()) == 0


def test_a_drain_that_runs_out_answers_the_rest_503(make_client, gated):
    client = make_client(backend=gated, drain_timeout=0.2, max_batch_size=1)
    state = client.app.state.stepimage
    gated.gate.clear()
    results = {}

    def post(name: str, seed: int) -> None:
        body = {"prompt": name, "size": SMALL, "steps": 1, "seed": seed, "response_format": "b64_json"}
        results[name] = client.post("/v1/images/generations", json=body)

    threads = [threading.Thread(target=post, args=("running", 1))]
    threads[0].start()
    assert gated.started.wait(10)
    threads.append(threading.Thread(target=post, args=("queued", 2)))
    threads[1].start()
    wait_for(lambda: state.engine.queued == 1)
    client.portal.call(state.drain)
    for thread in threads:
        thread.join(30)
    for name in ("running", "queued"):
        assert_error(results[name], 503, None, "not_ready")
        assert int(results[name].headers["retry-after"]) >= 1
    assert state.cut_short == 2
    assert state.draining and not state.ready


def test_a_drain_that_finishes_cuts_nothing_short(make_client, gated):
    client = make_client(backend=gated, drain_timeout=30)
    state = client.app.state.stepimage
    client.portal.call(state.drain)
    assert state.cut_short == 0
    assert_error(client.get("/ready"), 503, None, "not_ready")


def test_a_body_that_stops_arriving_raises_408_and_the_rest_waits_freely():
    """The body guard at the ASGI level (a test client buffers whole bodies, so it cannot stall one)."""
    from server.app import BodyLimitMiddleware
    from server.errors import RequestTimeout

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())

    async def stalls_after_one_chunk():
        if not seen:
            return {"type": "http.request", "body": b'{"prompt": "x', "more_body": True}
        await asyncio.sleep(3600)

    guard = BodyLimitMiddleware(app, max_bytes=1024, idle_timeout=0.2)
    scope = {"type": "http", "headers": []}
    with pytest.raises(RequestTimeout) as stopped:
        asyncio.run(guard(scope, stalls_after_one_chunk, None))
    assert "0.2 seconds" in stopped.value.message
    assert stopped.value.close_connection

    # Once the body is complete, receive() only waits for a disconnect: no deadline applies to that.
    async def whole_then_disconnect_later():
        if not seen:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(0.5)
        return {"type": "http.disconnect"}

    seen.clear()
    asyncio.run(guard(scope, whole_then_disconnect_later, None))
    assert [message["type"] for message in seen] == ["http.request", "http.disconnect"]
