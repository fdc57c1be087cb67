"""url results through the app on both storage backends: a real directory and a real S3 bucket (SeaweedFS).

Save, fetch, expiry (a 404 from the moment a link expires, sweep or not), sweeping, health (/ready, metrics, url
requests refused before any compute), and what a broken storage answers (503/507 envelopes, never a 500).
"""

from __future__ import annotations

import base64
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.storage import BucketStore, StorageConfigError, open_store
from tests.api.conftest import SMALL, assert_error
from tests.conftest import metric, wait_for
from tests.s3server import free_ports, seaweedfs

pytestmark = pytest.mark.api

BODY = {"prompt": "a lighthouse", "size": SMALL, "steps": 1, "seed": 7}
# Long enough that nothing runs by itself during a test; tests sweep and check explicitly.
QUIET = {"sweep_interval": 3600, "storage_check_interval": 3600}
TTL = 2
# A bucket's LastModified has whole seconds and the store counts from the end of that second: a link may live up to
# 1 s past its TTL, never less.
EXPIRY_SLACK = 1.2


def post(client, **fields):
    return client.post("/v1/images/generations", json={**BODY, **fields})


def name_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    """The SeaweedFS credentials in the AWS environment variables, where boto3 looks for them."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """Settings for each backend, and a way to list what is stored."""
    if request.param == "local":
        directory = tmp_path / "results"
        return {"storage_dir": directory}, lambda: sorted(path.name for path in directory.iterdir())
    server = request.getfixturevalue("aws_env")
    bucket = server.new_bucket()
    return server.settings(bucket), lambda: [key.rsplit("/", 1)[1] for key in server.keys(bucket)]


def test_url_results_round_trip_byte_for_byte(make_client, backend):
    settings, stored = backend
    client = make_client(**settings, **QUIET)
    for fmt, media in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        url = post(client, output_format=fmt).json()["data"][0]["url"]
        inline = base64.b64decode(
            post(client, output_format=fmt, response_format="b64_json").json()["data"][0]["b64_json"]
        )
        fetched = client.get(url)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == media
        assert fetched.content == inline
        assert fetched.headers["content-length"] == str(len(inline))
        max_age = int(fetched.headers["cache-control"].split("max-age=")[1])
        assert 7100 < max_age <= 7200
        assert name_of(url) in stored()


def test_expired_links_are_404_before_any_sweep_and_the_sweep_deletes_them(make_client, backend):
    settings, stored = backend
    client = make_client(**settings, **QUIET, url_ttl=TTL)
    urls = [post(client).json()["data"][0]["url"]]
    assert client.get(urls[0]).status_code == 200
    urls += [post(client).json()["data"][0]["url"] for _ in range(2)]
    time.sleep(TTL + EXPIRY_SLACK)
    # Still stored (nothing swept yet), but expired: not served.
    assert len(stored()) == 3
    assert_error(client.get(urls[0]), 404, None, "not_found")
    # Reading an expired result deletes it; the sweep deletes the rest.
    assert len(stored()) == 2
    fresh = post(client).json()["data"][0]["url"]
    assert client.app.state.stepimage.store.sweep() == 2
    assert stored() == [name_of(fresh)]
    assert client.get(fresh).status_code == 200


def test_storage_health_is_published(make_client, backend):
    settings, _ = backend
    client = make_client(**settings, **QUIET)
    assert client.get("/ready").status_code == 200
    assert metric(client, "stepimage_storage_ok") == 1
    free = metric(client, "stepimage_storage_free_bytes")
    if settings.get("storage") == "s3":
        assert free != free  # NaN: a bucket has no free space to report
    else:
        assert free > 0


def test_unknown_and_malformed_names_are_404(make_client, backend):
    settings, _ = backend
    client = make_client(**settings, **QUIET)
    for name in ("A" * 32 + ".png", "..%2F..%2Fsecret.png", "x.png", "A" * 32 + ".exe"):
        assert_error(client.get(f"/v1/images/files/{name}"), 404, None, "not_found")


# -- the bucket ----------------------------------------------------------------------------------


def test_a_link_made_by_one_app_is_served_by_another(make_client, aws_env, tmp_path):
    bucket = aws_env.new_bucket()
    first = make_client(**aws_env.settings(bucket), **QUIET)
    second = make_client(**aws_env.settings(bucket), **QUIET, storage_dir=tmp_path / "unused")
    url = post(first).json()["data"][0]["url"]
    assert second.get(url).content == first.get(url).content
    assert aws_env.keys(bucket) == ["results/" + name_of(url)]
    # Nothing went to the local directory.
    assert not (tmp_path / "unused").exists() or not list((tmp_path / "unused").iterdir())


def test_sweeps_from_several_replicas_at_once_are_safe_and_touch_only_results(aws_env):
    bucket = aws_env.new_bucket()
    client = aws_env.client()
    settings = Settings(**aws_env.settings(bucket), url_ttl=TTL)
    stores = [open_store(settings) for _ in range(3)]
    names = [stores[0].save(b"png", "png") for _ in range(25)]
    # Others' objects under the prefix and anything outside it are not the sweep's to delete.
    client.put_object(Bucket=bucket, Key="results/operator-notes.txt", Body=b"keep")
    client.put_object(Bucket=bucket, Key="elsewhere/" + names[0], Body=b"keep")
    time.sleep(TTL + EXPIRY_SLACK)
    counts: list[int] = []
    threads = [threading.Thread(target=lambda s=store: counts.append(s.sweep())) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Each replica deleted what it saw expired; deleting what another already deleted is not an error.
    assert len(counts) == 3 and max(counts) <= 25 and sum(counts) >= 25
    assert aws_env.keys(bucket) == ["elsewhere/" + names[0], "results/operator-notes.txt"]
    assert all(store.health.ok for store in stores)


def test_a_bucket_that_goes_away_refuses_url_requests_before_compute(make_client, aws_env, gated):
    bucket = aws_env.new_bucket()
    client = make_client(backend=gated, **aws_env.settings(bucket), **QUIET)
    url = post(client).json()["data"][0]["url"]
    s3 = aws_env.client()
    s3.delete_object(Bucket=bucket, Key="results/" + name_of(url))
    s3.delete_bucket(Bucket=bucket)
    store = client.app.state.stepimage.store
    assert not store.refresh_health().ok

    before = len(gated.requests)
    error = assert_error(post(client), 503, None, "storage_unavailable")
    assert bucket not in error["message"] and aws_env.endpoint_url not in error["message"]
    assert "b64_json" in error["message"]
    assert len(gated.requests) == before  # refused before the engine
    assert post(client, response_format="b64_json").status_code == 200
    ready = assert_error(client.get("/ready"), 503, None, "not_ready")
    assert "bucket" in ready["message"]
    assert metric(client, "stepimage_storage_ok") == 0
    # Reading is a storage fault too, not a 404 or a 500.
    assert_error(client.get(url), 503, None, "storage_unavailable")

    s3.create_bucket(Bucket=bucket)
    assert store.refresh_health().ok
    assert client.get("/ready").status_code == 200
    assert client.get(post(client).json()["data"][0]["url"]).status_code == 200


def test_an_outage_mid_request_is_a_clean_envelope_and_the_server_keeps_serving(
    make_client, gated, tmp_path, monkeypatch
):
    # A private S3 server, so that it can really go away while the app runs.
    with seaweedfs(tmp_path / "private-s3") as private:
        for key, value in private.env().items():
            monkeypatch.setenv(key, value)
        bucket = private.new_bucket()
        client = make_client(backend=gated, **private.settings(bucket), **QUIET)
        url = post(client).json()["data"][0]["url"]
        private.stop()
        # The last health check said the bucket was fine, so this request runs and its write fails.
        before = len(gated.requests)
        error = assert_error(post(client), 503, None, "storage_unavailable")
        assert len(gated.requests) == before + 1
        assert "cannot be reached" in error["message"] and "b64_json" in error["message"]
        assert private.endpoint_url not in error["message"] and "127.0.0.1" not in error["message"]
        assert metric(client, 'stepimage_storage_failures_total{operation="write"}') == 1
        # The failed write marked the storage unhealthy: the next url request is refused before compute.
        assert_error(post(client), 503, None, "storage_unavailable")
        assert len(gated.requests) == before + 1
        assert post(client, response_format="b64_json").status_code == 200
        assert "cannot be reached" in assert_error(client.get("/ready"), 503, None, "not_ready")["message"]
        assert_error(client.get(url), 503, None, "storage_unavailable")
        assert metric(client, 'stepimage_storage_failures_total{operation="read"}') == 1


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"s3_bucket": "no-such-bucket"}, "--s3-bucket (STEPIMAGE_S3_BUCKET): the bucket 'no-such-bucket' does not"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "wrong"}}, "--s3-bucket (STEPIMAGE_S3_BUCKET): not allowed to reach"),
        (
            {"env": {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}},
            "s3 needs AWS credentials and none were found",
        ),
        ({"s3_endpoint_url": "unreachable"}, "--s3-endpoint-url (STEPIMAGE_S3_ENDPOINT_URL): cannot connect"),
    ],
    ids=["missing-bucket", "wrong-secret", "no-credentials", "unreachable"],
)
def test_start_up_check_of_the_bucket_names_the_setting(aws_env, monkeypatch, change, problem):
    settings = aws_env.settings(aws_env.new_bucket())
    for key, value in change.pop("env", {}).items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)
    if change.get("s3_endpoint_url") == "unreachable":
        change["s3_endpoint_url"] = f"http://127.0.0.1:{free_ports(1)[0]}"
    settings.update(change)
    with pytest.raises(StorageConfigError) as caught:
        open_store(Settings(**settings))
    message = str(caught.value)
    assert problem in message, message
    assert "\n" not in message
    assert aws_env.secret_key not in message and "wrong" not in message


def test_the_bucket_store_uses_only_its_prefix(aws_env):
    bucket = aws_env.new_bucket()
    store = open_store(Settings(**aws_env.settings(bucket, prefix="nested/images")))
    assert isinstance(store, BucketStore) and store.prefix == "nested/images/"
    name = store.save(b"bytes", "webp")
    assert aws_env.keys(bucket) == ["nested/images/" + name]
    stored = aws_env.client().head_object(Bucket=bucket, Key="nested/images/" + name)
    assert stored["ContentType"] == "image/webp"


# -- the local directory --------------------------------------------------------------------------


def test_a_failed_local_write_is_a_clean_envelope_and_recovers(make_client, tmp_path, gated):
    directory = tmp_path / "results"
    client = make_client(backend=gated, storage_dir=directory, **QUIET)
    # The directory is replaced by a file after start-up: every write into it now fails (ENOTDIR).
    os.rmdir(directory)
    directory.write_text("not a directory")
    error = assert_error(post(client), 503, None, "storage_unavailable")
    assert str(tmp_path) not in error["message"] and "b64_json" in error["message"]
    assert "results" not in error["message"]
    ready = assert_error(client.get("/ready"), 503, None, "not_ready")
    assert "the last write failed" in ready["message"] and str(tmp_path) not in ready["message"]
    assert post(client, response_format="b64_json").status_code == 200

    directory.unlink()
    store = client.app.state.stepimage.store
    assert store.refresh_health().ok
    assert client.get(post(client).json()["data"][0]["url"]).status_code == 200


@pytest.fixture
def loaded_client(gated, tmp_path):
    """Build a started client and wait for the model only: /ready may stay 503 for another reason."""
    opened = []

    def build(**overrides) -> TestClient:
        settings = Settings(**{"storage_dir": tmp_path / "files", "warmup": False, "extra_sizes": [SMALL], **overrides})
        client = TestClient(create_app(settings, backend=gated), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_for(lambda: client.app.state.stepimage.ready)
        return client

    yield build
    for client in opened:
        client.__exit__(None, None, None)


def test_low_free_space_refuses_url_requests_before_compute(loaded_client, tmp_path, gated):
    usage = os.statvfs(tmp_path)
    free_mb = usage.f_bavail * usage.f_frsize / 2**20
    client = loaded_client(storage_min_free_mb=free_mb * 4, **QUIET)
    ready = assert_error(client.get("/ready"), 503, None, "not_ready")
    assert "MiB free" in ready["message"] and "--storage-min-free-mb" in ready["message"]
    assert metric(client, "stepimage_storage_ok") == 0
    assert metric(client, "stepimage_storage_free_bytes") > 0
    error = assert_error(post(client), 507, None, "insufficient_storage")
    assert error["type"] == "server_error" and "b64_json" in error["message"]
    assert client.post("/v1/images/generations", json={**BODY, "response_format": "url"}).headers["retry-after"]
    assert gated.requests == []  # no compute was spent
    response = post(client, response_format="b64_json")
    assert response.status_code == 200 and len(gated.requests) == 1
