"""The Serve application on a real local Ray cluster: the HTTP contract through the ingress, work on both model
replicas, admission control, disconnects, deadlines, readiness, and replicas killed under load.

Tests run in file order on one shared cluster; each leaves the probe's gate open and both replicas running.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import image_bytes, parse_sse, wait_for
from tests.ray.conftest import (
    APP,
    INGRESS,
    MAX_QUEUE,
    MODEL,
    MODEL_REPLICAS,
    ROUTER_QUEUE,
    SMALL,
    URL_TTL,
    replica_tags,
    running_model_replicas,
    wait_ready,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

FAST = {"steps": 2}
BODY = {"prompt": "a lighthouse on a cliff", "size": SMALL, "response_format": "b64_json", **FAST}


def post(cluster, seed: int, timeout: float = 60.0, headers: dict | None = None, **fields) -> httpx.Response:
    from tests.ray.conftest import KEY

    return httpx.post(
        f"{cluster.base_url}/v1/images/generations",
        json={**BODY, "seed": seed, **fields},
        headers={"Authorization": f"Bearer {KEY}", **(headers or {})},
        timeout=timeout,
    )


def in_threads(calls) -> tuple[list[threading.Thread], list]:
    results: list = [None] * len(calls)

    def run(index, call):
        try:
            results[index] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects what each call ended with
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index, call)) for index, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()


def replica_counts(http: httpx.Client) -> dict[str, float]:
    pattern = r'^stepimage_model_replica_requests_total\{replica="([^"]+)"\} (\S+)$'
    return {replica: float(value) for replica, value in re.findall(pattern, http.get("/metrics").text, re.M)}


def metric(http: httpx.Client, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", http.get("/metrics").text, flags=re.M)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def stream_until_first_preview(cluster, seed: int, frames: list[str]) -> Iterator[Iterator[str]]:
    """Open a streamed generation of 4 steps with 2 previews and read it up to its first preview; yields the rest
    of its lines. Hold the job with `cluster.gate_closed(free_polls=2)` to keep it there."""
    from tests.ray.conftest import KEY

    body = {**BODY, "seed": seed, "steps": 4, "stream": True, "partial_images": 2}
    with httpx.stream(
        "POST", f"{cluster.base_url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            frames.append(line)
            if line.startswith("data:"):
                break
        yield lines


def events_for(cluster, seed: int, kind: str) -> list[dict]:
    return [event for event in cluster.events() if event["kind"] == kind and seed in event["seeds"]]


def process_ids(title: str) -> list[int]:
    """Processes whose command line (Ray's process title) contains `title`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


# -- the contract through the ingress -------------------------------------------------------------------


def test_generations_and_edits_through_the_openai_client_run_on_both_replicas(cluster, sdk, http):
    def generate(seed):
        return sdk.images.generate(
            model="step-image-edit-2",
            prompt="a lighthouse on a cliff",
            size=SMALL,
            response_format="b64_json",
            extra_body={"seed": seed, **FAST},
        )

    def edit(seed):
        return sdk.images.edit(
            model="step-image-edit-2",
            image=("in.png", image_bytes(96, 80, seed=seed), "image/png"),
            prompt="make the block blue",
            response_format="b64_json",
            extra_body={"seed": seed, **FAST},
        )

    # Rounds of concurrent requests: the router spreads concurrent work over the replicas.
    for round_ in range(5):
        threads, results = in_threads(
            [lambda s=seed: generate(s) for seed in range(10 * round_, 10 * round_ + 3)]
            + [lambda s=10 * round_ + 9: edit(s)]
        )
        join(threads)
        for result in results:
            assert not isinstance(result, Exception), result
        if len(replica_counts(http)) == MODEL_REPLICAS:
            break
    *generations, edited = results
    for seed, response in zip(range(10 * round_, 10 * round_ + 3), generations):
        (item,) = response.data
        assert item.model_extra["seed"] == seed
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (96, 80)

    counts = replica_counts(http)
    assert len(counts) == MODEL_REPLICAS, counts
    started_on = {event["replica"] for event in cluster.events() if event["kind"] == "finished"}
    assert set(counts) <= started_on
    # The same seed gives the same pixels whichever replica ran it.
    again = generate(0)
    first = sdk.images.generate(
        model="step-image-edit-2", prompt="a lighthouse on a cliff", size=SMALL, response_format="b64_json",
        extra_body={"seed": 0, **FAST},
    )  # fmt: skip
    assert again.data[0].b64_json == first.data[0].b64_json


def test_headers_errors_models_and_metrics_are_the_apps(cluster, http):
    response = http.post("/v1/images/generations", json={**BODY, "seed": 1, "output_format": "jpeg"})
    assert response.status_code == 200, response.text
    # One x-request-id (Serve's proxy sets it; the app adopts the same id), and the app's stage timings.
    assert len(response.headers.get_list("x-request-id")) == 1
    stages = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert {"queue", "encode_prompt", "denoise", "decode", "encode_image", "total"} <= set(stages)
    assert response.json()["data"][0]["b64_json"].startswith("/9j/")  # JPEG

    mine = http.post("/v1/images/generations", json={**BODY, "seed": 1}, headers={"x-request-id": "trace-42"})
    assert mine.headers.get_list("x-request-id") == ["trace-42"]

    no_key = httpx.post(f"{cluster.base_url}/v1/images/generations", json=BODY, timeout=30)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    blank = http.post("/v1/images/generations", json={**BODY, "prompt": " "})
    assert blank.status_code == 400
    assert blank.json()["error"]["param"] == "prompt"
    unknown = http.get("/v2/nothing")
    assert unknown.status_code == 404
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}

    models = http.get("/v1/models").json()["data"]
    assert models[0]["id"] == "step-image-edit-2"
    assert models[0]["backend"] == "tiny" and models[0]["random_weights"] is True

    metrics = http.get("/metrics").text
    assert 'stepimage_requests_total{route="/v1/images/generations",status="200"}' in metrics
    assert "stepimage_stage_seconds_bucket" in metrics
    assert metric(http, "stepimage_ready") == 1


def test_url_results_are_stored_and_downloadable(cluster, http):
    response = http.post("/v1/images/generations", json={**BODY, "seed": 3, "response_format": "url"})
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{cluster.base_url}/v1/images/files/")
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (64, 64)


def test_url_results_live_in_the_bucket_outlive_the_ingress_that_wrote_them_and_expire(cluster, http):
    response = http.post("/v1/images/generations", json={**BODY, "seed": 9001, "response_format": "url"})
    url = response.json()["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    first = httpx.get(url, timeout=30)
    assert first.status_code == 200

    def stored() -> list[str]:
        return [key for key in cluster.s3.keys(cluster.bucket) if key.endswith(name)]

    assert stored()
    # Every ingress replica that wrote or served it goes away; their replacements serve the link from the bucket.
    writers = replica_tags(INGRESS)
    for tag in writers:
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{INGRESS}#{tag}", namespace="serve"), no_restart=True)
    wait_for(lambda: replica_tags(INGRESS) and not replica_tags(INGRESS) & writers, 120)
    wait_ready(cluster.base_url)
    again = httpx.get(url, timeout=30)
    assert again.status_code == 200
    assert again.content == first.content
    # Expiry is the server's, not a header's: the link answers 404 after its lifetime, and the sweep deletes it.
    wait_for(lambda: httpx.get(url, timeout=30).status_code == 404, URL_TTL + 30)
    expired = httpx.get(url, timeout=30)
    assert expired.json()["error"]["code"] == "not_found"
    wait_for(lambda: not stored(), 60)


def test_the_ingress_does_no_torch_work(cluster, http):
    assert http.get("/ready").status_code == 200
    ingress = process_ids(f"ServeReplica:{APP}:{INGRESS}")
    models = process_ids(f"ServeReplica:{APP}:{MODEL}")
    assert ingress and models
    # The check can tell: the model replicas do map torch's library.
    assert all(maps_torch(pid) for pid in models)
    assert not any(maps_torch(pid) for pid in ingress)


# -- streaming --------------------------------------------------------------------------------------------------


def test_streamed_generations_and_edits_with_several_images_and_a_mask(sdk):
    events = list(
        sdk.images.generate(
            model="step-image-edit-2", prompt="a kite", size=SMALL, stream=True, partial_images=2,
            response_format="b64_json", extra_body={"steps": 4, "seed": 9},
        )
    )  # fmt: skip
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    completed = events[-1]
    assert completed.model_extra["seed"] == 9 and completed.size == SMALL
    assert Image.open(io.BytesIO(base64.b64decode(completed.b64_json))).size == (64, 64)

    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 16, 64, 48))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    images = [("a.png", image_bytes(96, 64, seed=1), "image/png"), ("b.png", image_bytes(64, 64, seed=2), "image/png")]
    events = list(
        sdk.images.edit(
            model="step-image-edit-2",
            image=images,
            mask=("m.png", buffer.getvalue(), "image/png"),
            prompt="put image 2 in the hole", stream=True, partial_images=1, response_format="b64_json",
            extra_body={"steps": 3, "seed": 4},
        )
    )  # fmt: skip
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json))).size == (96, 64)


def test_a_client_that_hangs_up_mid_stream_stops_its_job(cluster):
    with cluster.gate_closed(free_polls=2):
        with stream_until_first_preview(cluster, 7501, []):
            pass  # leaving the block closes the connection after the first preview
        wait_for(lambda: events_for(cluster, 7501, "cancelled"), 30)
    (cancelled,) = events_for(cluster, 7501, "cancelled")
    assert cancelled["polls"] == 3  # held at the step after the preview, and stopped there
    assert not events_for(cluster, 7501, "finished")


# -- admission control, deadlines, disconnects ---------------------------------------------------------------


def test_a_saturation_burst_gets_only_200_or_429_with_retry_after(cluster, http):
    capacity = MODEL_REPLICAS * MAX_QUEUE + ROUTER_QUEUE
    burst = capacity + 6
    rejected_before = metric(http, "stepimage_rejections_total")
    with cluster.gate_closed():
        threads, results = in_threads([lambda s=seed: post(cluster, s) for seed in range(1000, 1000 + burst)])

        def refused() -> int:
            return sum(isinstance(r, httpx.Response) and r.status_code == 429 for r in results)

        # While the jobs are held, exactly the surplus is refused, at once.
        try:
            wait_for(lambda: refused() == burst - capacity, 60)
        except AssertionError:
            pytest.fail(f"not refused at once: {[getattr(r, 'status_code', r) for r in results]}")
        assert metric(http, "stepimage_in_flight") == capacity
    join(threads)
    statuses = [getattr(response, "status_code", response) for response in results]
    assert sorted(statuses) == [200] * capacity + [429] * (burst - capacity), statuses
    assert metric(http, "stepimage_rejections_total") == rejected_before + burst - capacity
    for response in results:
        if response.status_code == 429:
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded")
            assert int(response.headers["retry-after"]) >= 1
            assert len(response.headers.get_list("x-request-id")) == 1


def test_a_client_that_hangs_up_stops_its_job_at_the_next_step(cluster, http):
    cancelled_before = metric(http, "stepimage_cancellations_total")
    with cluster.gate_closed():
        with pytest.raises(httpx.ReadTimeout):
            post(cluster, 2001, timeout=3.0, steps=8)
        wait_for(lambda: events_for(cluster, 2001, "cancelled"), 30)
    (cancelled,) = events_for(cluster, 2001, "cancelled")
    # Held at its first step boundary, it stopped there: no further step ran.
    assert cancelled["polls"] == 1
    assert not events_for(cluster, 2001, "finished")
    wait_for(lambda: metric(http, "stepimage_cancellations_total") == cancelled_before + 1, 10)
    # The replica is free again: the next requests run.
    assert post(cluster, 2002).status_code == 200


def test_a_deadline_gives_504_and_stops_the_job(cluster, http):
    with cluster.gate_closed():
        response = post(cluster, 3001, headers={"x-request-timeout": "1"})
        wait_for(lambda: events_for(cluster, 3001, "cancelled"), 30)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert events_for(cluster, 3001, "cancelled")[0]["polls"] == 1
    assert metric(http, "stepimage_timeouts_total") >= 1


# -- replica faults (last: they replace replicas) ---------------------------------------------------------------


def kill_replica(tag: str) -> None:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{MODEL}#{tag}", namespace="serve")
    ray.kill(actor, no_restart=True)


def wait_for_replacements(gone: set[str], timeout: float = 180.0) -> set[str]:
    """Wait until Serve runs the full count of model replicas again, none of them in `gone`."""

    def replaced() -> bool:
        tags = replica_tags()
        return len(tags) == MODEL_REPLICAS and not tags & gone and running_model_replicas() == MODEL_REPLICAS

    wait_for(replaced, timeout)
    return replica_tags()


def test_killing_a_replica_under_load_loses_no_request_and_it_comes_back(cluster, http):
    seeds = list(range(4001, 4001 + MAX_QUEUE + 1))
    with cluster.gate_closed():
        threads, results = in_threads([lambda s=seed: post(cluster, s) for seed in seeds])

        def both_hold_a_job() -> bool:
            return len({e["replica"] for s in seeds for e in events_for(cluster, s, "started")}) == MODEL_REPLICAS

        wait_for(both_hold_a_job, 60)
        victim = sorted({e["replica"] for s in seeds for e in events_for(cluster, s, "started")})[0]
        held = [s for s in seeds if any(e["replica"] == victim for e in events_for(cluster, s, "started"))]
        kill_replica(victim)
        # One replica is still up: the application stays ready.
        assert http.get("/ready").status_code == 200
    join(threads)
    assert [r.status_code for r in results] == [200] * len(seeds), [str(getattr(r, "text", r))[-300:] for r in results]
    # The victim's accepted requests were sent again and finished on the other replica.
    for seed in held:
        assert any(e["replica"] != victim for e in events_for(cluster, seed, "finished"))
    assert metric(http, "stepimage_model_replica_retries_total") >= len(held)

    replacements = wait_for_replacements({victim})
    newcomer = (replacements - {e["replica"] for e in cluster.events()}) or replacements
    # The replacement takes work. Pairs of requests never exceed one replica's queue, so all must succeed.
    for round_ in range(20):
        seeds = range(5000 + 2 * round_, 5002 + 2 * round_)
        threads, results = in_threads([lambda s=seed: post(cluster, s) for seed in seeds])
        join(threads)
        assert [r.status_code for r in results] == [200, 200], [str(getattr(r, "text", r))[-300:] for r in results]
        if newcomer & {e["replica"] for e in cluster.events()}:
            break
    assert newcomer & {e["replica"] for e in cluster.events()}


def test_a_stream_whose_replica_dies_goes_on_elsewhere_without_repeating_a_preview(cluster, http):
    retries_before = metric(http, "stepimage_model_replica_retries_total")
    frames: list[str] = []
    # The first preview comes after the second step boundary; the job is held at the third.
    with cluster.gate_closed(free_polls=2), stream_until_first_preview(cluster, 7001, frames) as rest:
        (victim,) = {event["replica"] for event in events_for(cluster, 7001, "started")}
        kill_replica(victim)
        wait_for(lambda: len(events_for(cluster, 7001, "started")) == 2, 60)
        ray.get(cluster.probe.open_gate.remote())
        frames.extend(rest)
    events = parse_sse("\n".join(frames) + "\n")
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [data["partial_image_index"] for _, data in events[:2]] == [0, 1]
    assert events[-1][1]["seed"] == 7001
    finished = events_for(cluster, 7001, "finished")
    assert [event["replica"] for event in finished] != [victim] and len(finished) == 1
    assert metric(http, "stepimage_model_replica_retries_total") == retries_before + 1


def test_a_replica_whose_engine_worker_stopped_fails_its_health_check_and_is_replaced(cluster, http):
    retries_before = metric(http, "stepimage_model_replica_retries_total")
    ray.get(cluster.probe.stop_a_worker.remote())
    # The request's job is lost with the worker; Serve's health check finds the worker gone, replaces the replica,
    # and the ingress sends the request to the other one.
    response = post(cluster, 8001)
    assert response.status_code == 200, response.text
    (stopped,) = events_for(cluster, 8001, "worker stopped")
    (finished,) = events_for(cluster, 8001, "finished")
    assert finished["replica"] != stopped["replica"]
    assert metric(http, "stepimage_model_replica_retries_total") == retries_before + 1
    wait_for_replacements({stopped["replica"]})


def test_ready_is_503_while_no_model_replica_runs_then_200_again(cluster, http):
    before = replica_tags()
    for tag in before:
        kill_replica(tag)

    def not_ready() -> bool:
        return http.get("/ready").status_code == 503

    wait_for(not_ready, 30)
    response = http.get("/ready")
    if response.status_code == 503:  # it may already be back
        error = response.json()["error"]
        assert error["code"] == "not_ready"
        assert response.headers["retry-after"]
    assert http.get("/health").status_code == 200
    wait_for_replacements(before)
    wait_for(lambda: http.get("/ready").status_code == 200, 30)
    assert post(cluster, 6001).status_code == 200
