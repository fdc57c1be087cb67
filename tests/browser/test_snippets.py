"""The history's "Copy as curl" and "Copy as Python": the copied code, run as it is against the same server,
makes the same images the page showed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.conftest import KEY
from tests.browser.helpers import file_payload, fill, picture, response_images, send, sse_events

pytestmark = pytest.mark.browser

# Quotes, an @ and a < (which curl -F would read as file names), a semicolon, and a non-ASCII character.
TRICKY_PROMPT = """It's a "quoted" @home <sign>; café"""


def copied(page, which: str, entry: int = 0) -> str:
    page.locator("#history > li").nth(entry).get_by_role("button", name=f"Copy as {which}").click()
    return page.evaluate("navigator.clipboard.readText()")


def run_python(code: str, workdir: Path, key: str | None = None) -> str:
    (workdir / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "STEPIMAGE_API_KEY"}
    if key:
        env["STEPIMAGE_API_KEY"] = key
    done = subprocess.run(
        [sys.executable, "snippet.py"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_curl(command: str, workdir: Path, key: str | None = None) -> str:
    env = {**os.environ, "STEPIMAGE_API_KEY": key or ""}
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def download_inputs(page, workdir: Path) -> list[str]:
    """Save the history entry's input files (images, mask) under the names its snippets use."""
    names = []
    for link in page.locator("#history > li").first.locator(".history-files a").all():
        with page.expect_download() as download:
            link.click()
        download.value.save_as(workdir / download.value.suggested_filename)
        names.append(download.value.suggested_filename)
    return names


def test_generation_as_python_and_curl(page, tmp_path, curl):
    fill(page, TRICKY_PROMPT, seed=31, steps=2)
    page.get_by_label("Images (n)").fill("2")
    page.get_by_label("Output format").select_option("jpeg")
    page.get_by_label("Quality (0-100)").fill("80")
    page.get_by_label("Text mode").check()
    images = response_images(send(page, count=2))
    # Shown as text, never as markup.
    assert page.locator("#history .history-prompt").first.inner_text() == TRICKY_PROMPT

    python = copied(page, "Python")
    assert "extra_body={" in python and '"seed": 31' in python and "output_compression=80" in python
    output = run_python(python, tmp_path)
    assert output.split() == ["saved", "result-31.jpg", "saved", "result-32.jpg"]
    assert [(tmp_path / f"result-{seed}.jpg").read_bytes() for seed in (31, 32)] == images

    if curl is None:
        pytest.skip("curl is not installed here (.ci/run installs it)")
    body = json.loads(run_curl(copied(page, "curl"), tmp_path))
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == images


def test_edit_with_a_drawn_seed_as_python_and_curl(page, open_server, tmp_path, curl):
    page.get_by_label("Edit", exact=True).check()
    files = [
        file_payload("first image.png", picture(96, 80, seed=1)),
        file_payload("second.png", picture(64, 64, seed=2)),
    ]
    page.get_by_label("Image", exact=True).set_input_files(files)
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=4)
    page.mouse.up()
    fill(page, TRICKY_PROMPT)  # no seed: the server draws one, and the snippet writes it in
    answer = send(page, "Edit")
    seed = answer.json()["data"][0]["seed"]
    images = response_images(answer)

    names = download_inputs(page, tmp_path)
    # File names are made safe for a shell and a form.
    assert names == ["first-image.png", "second.png", "mask.png"]
    python = copied(page, "Python")
    assert f'"seed": {seed}' in python
    run_python(python, tmp_path)
    assert (tmp_path / f"result-{seed}.png").read_bytes() == images[0]

    if curl is None:
        pytest.skip("curl is not installed here (.ci/run installs it)")
    body = json.loads(run_curl(copied(page, "curl"), tmp_path))
    assert base64.b64decode(body["data"][0]["b64_json"]) == images[0]


def test_snippets_read_the_key_from_the_environment(new_page, keyed_server, tmp_path, curl):
    page = new_page(keyed_server.base_url)
    page.get_by_label("API key", exact=True).fill(KEY)
    page.get_by_role("button", name="Use key").click()
    page.get_by_role("button", name="Forget API key").wait_for()
    fill(page, "keyed", seed=3)
    image = response_images(send(page))[0]
    python, command = copied(page, "Python"), copied(page, "curl")
    assert KEY not in python and KEY not in command
    assert 'os.environ["STEPIMAGE_API_KEY"]' in python and "$STEPIMAGE_API_KEY" in command
    run_python(python, tmp_path, key=KEY)
    assert (tmp_path / "result-3.png").read_bytes() == image
    if curl is None:
        pytest.skip("curl is not installed here (.ci/run installs it)")
    body = json.loads(run_curl(command, tmp_path, key=KEY))
    assert base64.b64decode(body["data"][0]["b64_json"]) == image


def test_streamed_request_as_python_and_curl(page, open_server, tmp_path, curl):
    fill(page, "streamed", seed=8, steps=4, previews=1)
    image = response_images(send(page))[0]
    python = copied(page, "Python")
    assert "stream=True" in python and "partial_images=1" in python
    output = run_python(python, tmp_path)
    assert output.splitlines() == ["preview 0 of image 0", "saved result-8.png"]
    assert (tmp_path / "result-8.png").read_bytes() == image
    if curl is None:
        pytest.skip("curl is not installed here (.ci/run installs it)")
    events = sse_events(run_curl(copied(page, "curl"), tmp_path))
    assert [event["type"] for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert base64.b64decode(events[-1]["b64_json"]) == image
