"""End to end, the contract's edges on a real `stepimage serve` process: hostile JSON, bounded echoes, strict
validation and the output-pixel cap through the official `openai` SDK and raw HTTP, and /docs and /redoc rendered by
a real browser that may reach nothing but this server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from server.protocol import EditsBody, GenerationsBody
from tests.e2e.cdp import NO_INTERNET, Browser
from tests.e2e.test_server_process import AUTH, FAST, KEY, MODEL, assert_envelope, generate, make_image

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def solid_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 160, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- hostile or sloppy requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1000, 200_000])
def test_deeply_nested_json_is_a_400_from_the_real_server(server, http, depth):
    body = b"[" * depth + b"]" * depth
    for path in ("/v1/images/generations", "/v1/images/edits"):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_envelope(response, 400, code="invalid_json")
    assert "RecursionError" not in server.log_path.read_text(errors="replace")
    assert generate(http, seed=1).status_code == 200


def test_a_lone_surrogate_is_an_encoding_error(http):
    raw = json.dumps({"prompt": "PLACEHOLDER", "size": "64x64", **FAST}).replace("PLACEHOLDER", "a\\udc80b")
    response = http.post("/v1/images/generations", content=raw.encode(), headers={"Content-Type": "application/json"})
    error = assert_envelope(response, 400, param="prompt")
    assert "Unicode" in error["message"]


def test_sdk_huge_model_name_is_not_echoed(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="m" * 100_000, prompt="x", size="64x64", extra_body=FAST)
    message = caught.value.body["message"]
    assert caught.value.body["code"] == "model_not_found" and len(message) < 400, message[:500]


@pytest.mark.parametrize("value", ["yes", "on", 1])
def test_sdk_text_mode_must_be_a_boolean(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=MODEL, prompt="x", size="64x64", extra_body={**FAST, "text_mode": value})
    assert caught.value.body["param"] == "text_mode"


def test_sdk_edit_with_a_malformed_size_is_refused_and_a_valid_one_ignored(client):
    image = ("in.png", make_image(96, 64), "image/png")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model=MODEL, image=image, prompt="x", size="huge", extra_body=FAST)
    assert caught.value.body["param"] == "size"
    edited = client.images.edit(
        model=MODEL, image=image, prompt="x", size="1024x1024", response_format="b64_json", extra_body=FAST
    )
    assert len(edited.data) == 1


def test_sdk_edit_over_the_output_pixel_cap_names_n(server, client):
    # Four 4096x4096 results (a 117 MB response) exceed the default cap; one does not.
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model=MODEL, image=("big.png", solid_png(4096, 4096), "image/png"), prompt="x", n=4)
    assert caught.value.body["param"] == "n"
    assert "n may be at most 1" in caught.value.body["message"]


# -- the schema and its pages ----------------------------------------------------------------------------------------


def test_openapi_document_from_the_real_server(base_url):
    document = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    edits = document["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    }
    assert edits["security"] == [{"bearerAuth": []}]
    generations = document["paths"]["/v1/images/generations"]["post"]
    example = generations["requestBody"]["content"]["application/json"]["example"]
    made = httpx.post(
        f"{base_url}/v1/images/generations", json={**example, "size": "64x64", **FAST}, headers=AUTH, timeout=60
    )
    assert made.status_code == 200, made.text


def need_chromium() -> str:
    if CHROMIUM is None:
        # CI must run these: there a missing browser is a missing install step, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI installs Debian's chromium for the browser tests")
        pytest.skip("chromium is not installed")
    return CHROMIUM


def render(url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium that can resolve no host but this machine."""
    command = [
        need_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        # Every name resolves to nothing except the loopback address: a CDN asset would fail to load.
        NO_INTERNET,
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_swagger_ui_renders_offline_with_request_editors(base_url, tmp_path):
    dom = render(f"{base_url}/docs#/default/createImageEdit", tmp_path)
    # Rendered by Swagger UI's script (the served HTML has an empty div): both image operations, the opened
    # edit operation's body editor with both content types, its form fields and the Execute button.
    assert "/v1/images/generations" in dom and "/v1/images/edits" in dom
    assert "multipart/form-data" in dom and "application/json" in dom
    # The form editor shows every field a multipart edit takes (images is the JSON body's shape).
    missing = [name for name in EditsBody.model_fields if name != "images" and f">{name}<" not in dom]
    assert not missing, missing
    assert "Execute" in dom


def test_redoc_renders_offline(base_url, tmp_path):
    dom = render(f"{base_url}/redoc", tmp_path)
    assert "Edit an image from a prompt" in dom and "Create images from a prompt" in dom
    missing = [name for name in GenerationsBody.model_fields if name not in dom]
    assert not missing, missing


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    opened = Browser(need_chromium(), tmp_path / "profile")
    try:
        yield opened
    finally:
        opened.close()


def try_it_out(page, operation: str, filled: str) -> tuple[str, dict]:
    """Once the operation's editor is `filled` (a selector whose element has a value), authorize with the key,
    press Execute, and read the live response's status and body."""
    selector = f"#operations-default-{operation}"
    page.wait_for(f"!!document.querySelector('{selector} .execute')")
    # Swagger UI fills its editor after drawing the button; Execute on an empty editor sends nothing.
    page.wait_for(f"document.querySelector('{selector} {filled}')?.value")
    # Swagger UI's own call behind its Authorize dialog.
    page.evaluate(f"ui.preauthorizeApiKey('bearerAuth', '{KEY}')")
    page.evaluate(f"document.querySelector('{selector} .execute').click()")
    try:
        status = page.wait_for(
            f"document.querySelector('{selector} .live-responses-table tbody .response-col_status')?.innerText", 120
        )
    except TimeoutError:
        shown = page.evaluate(f"document.querySelector('{selector}')?.innerText")
        pytest.fail(f"no response shown after Execute; the operation reads:\n{shown}")
    body = page.evaluate(f"document.querySelector('{selector} .live-responses-table tbody pre.microlight')?.innerText")
    return status.strip(), json.loads(body)


def test_swagger_try_it_out_runs_the_documented_json_generation(base_url, browser):
    # The body editor starts from the documented example; Execute sends it with the key, as a person would.
    page = browser.open(f"{base_url}/docs#/default/createImage")
    status, body = try_it_out(page, "createImage", ".body-param textarea")
    assert status == "200", body
    assert body["data"][0]["seed"] == 42 and body["size"] == "1024x1024" and "b64_json" in body["data"][0]


def test_swagger_try_it_out_runs_a_multipart_edit_with_a_chosen_file(base_url, browser, tmp_path):
    picture = tmp_path / "input.png"
    picture.write_bytes(make_image(96, 64))
    page = browser.open(f"{base_url}/docs#/default/createImageEdit")
    page.wait_for("!!document.querySelector('#operations-default-createImageEdit input[type=file]')")
    page.set_files("#operations-default-createImageEdit input[type=file]", [picture])
    status, body = try_it_out(page, "createImageEdit", "input[type=file]")
    assert status == "200", body
    # Every field left at its documented default: a stored result's URL, the input's size (HEIGHTxWIDTH).
    assert body["size"] == "64x96" and body["data"][0]["url"].startswith(base_url)
