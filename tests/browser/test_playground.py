"""The playground page in headless Chromium against a real `stepimage serve` (tiny model): what a person does
with it, checked against what the API itself answers."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.browser.conftest import KEY, OPEN_MAX_QUEUE, PHONE, SMALL
from tests.browser.helpers import (
    RESULTS,
    decoded,
    file_payload,
    fill,
    picture,
    response_images,
    result_sizes,
    send,
    sent_form,
    sse_events,
)
from tests.conftest import metric, wait_for

pytestmark = pytest.mark.browser

STAGES = ["queue", "encode_prompt", "denoise", "decode", "encode_image", "total"]


def test_generate_shows_the_api_result_seeds_and_timings(page, open_server):
    assert page.get_by_role("note").inner_text().startswith("Tiny random-weight model: images are noise")
    fill(page, "A red bicycle", seed=7, steps=3)
    page.get_by_label("Images (n)").fill("2")
    answer = send(page, count=2)

    sent = answer.request.post_data_json
    assert sent == {
        "model": "step-image-edit-2",
        "prompt": "A red bicycle",
        "seed": 7,
        "steps": 3,
        "cfg_scale": 1,
        "text_mode": False,
        "size": SMALL,
        "n": 2,
        "response_format": "b64_json",
        "output_format": "png",
    }
    # The page shows exactly what the API makes for these fields: the same request sent directly gives the same
    # images (the tiny model is deterministic for a seed).
    direct = httpx.post(open_server.base_url + "/v1/images/generations", json=sent, timeout=60).json()
    assert response_images(answer) == [base64.b64decode(item["b64_json"]) for item in direct["data"]]
    assert result_sizes(page) == [[128, 128], [128, 128]]
    alts = page.eval_on_selector_all(RESULTS, "imgs => imgs.map(img => img.alt)")
    assert alts == ["Result 1 of 2, seed 7: A red bicycle", "Result 2 of 2, seed 8: A red bicycle"]
    assert page.locator("#results .seed-value").all_inner_texts() == ["7", "8"]

    # The latency breakdown under each result is the server-timing header's.
    timing = [part.split(";dur=") for part in answer.headers["server-timing"].split(", ")]
    header = {stage: float(duration) for stage, duration in timing}
    first = page.locator("#results .result").first
    assert first.locator(".timing-list dt").all_inner_texts() == STAGES
    shown = first.locator(".timing-list dd").all_inner_texts()
    assert shown == [f"{header[stage]:.1f} ms" for stage in STAGES]
    usage = answer.json()["usage"]
    text, image = usage["input_tokens_details"]["text_tokens"], usage["input_tokens_details"]["image_tokens"]
    assert first.locator(".usage").inner_text() == (
        f"Tokens: input {usage['input_tokens']} (text {text}, image {image}), output {usage['output_tokens']}."
    )

    # Each result downloads as the file the API sent.
    with page.expect_download() as download:
        first.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "result-7.png"
    assert Path(download.value.path()).read_bytes() == response_images(answer)[0]

    # The seed is copyable, and "Reuse" puts the last seed back in the form.
    page.get_by_role("button", name="Copy seed").first.click()
    assert page.evaluate("navigator.clipboard.readText()") == "7"
    page.get_by_role("button", name="Random").click()
    assert page.get_by_label("Seed").input_value() == ""
    page.get_by_role("button", name="Reuse 7").click()
    assert page.get_by_label("Seed").input_value() == "7"


def test_a_random_seed_is_reported_and_reusable(page):
    fill(page, "a lighthouse")
    answer = send(page)
    assert "seed" not in answer.request.post_data_json  # the server draws it
    seed = answer.json()["data"][0]["seed"]
    assert page.locator("#results .seed-value").inner_text() == str(seed)
    page.get_by_role("button", name="Use seed").click()
    assert page.get_by_label("Seed").input_value() == str(seed)

    # "Use these settings" puts a history entry's request back in the form, as it was sent.
    fill(page, "something else", seed=99, steps=5)
    page.get_by_label("Text mode").check()
    send(page)
    older = page.locator("#history > li").nth(1)
    assert older.locator(".history-prompt").inner_text() == "a lighthouse"
    older.get_by_role("button", name="Use these settings").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a lighthouse"
    assert page.get_by_label("Seed").input_value() == ""
    assert page.get_by_label("Steps").input_value() == "2"
    assert not page.get_by_label("Text mode").is_checked()


def test_upload_and_edit_keeps_the_input_size(page, open_server):
    page.get_by_label("Edit", exact=True).check()
    assert page.get_by_role("button", name="Edit", exact=True).is_visible()
    assert not page.get_by_role("button", name="Generate").is_visible()
    assert not page.get_by_label("Size (H x W)").is_visible()
    source = picture(96, 64)
    page.get_by_label("Image", exact=True).set_input_files(file_payload("photo.png", source))
    page.get_by_text("Edited · photo.png · 96x64").wait_for()
    fill(page, "make it blue", seed=3)
    answer = send(page, "Edit")

    parts = sent_form(page)
    assert ("image", "photo.png", source) in parts
    fields = {name: content.decode() for name, filename, content in parts if filename is None}
    assert fields["prompt"] == "make it blue" and fields["seed"] == "3" and fields["response_format"] == "b64_json"
    assert "size" not in fields and "mask" not in fields
    assert result_sizes(page) == [[96, 64]]
    direct = httpx.post(
        open_server.base_url + "/v1/images/edits",
        data=fields,
        files={"image": ("photo.png", source, "image/png")},
        timeout=60,
    ).json()
    assert response_images(answer) == [base64.b64decode(direct["data"][0]["b64_json"])]


def test_edit_this_result_chains_edits(page):
    fill(page, "a house", seed=11)
    first = response_images(send(page))[0]
    page.get_by_role("button", name="Edit this result").click()
    page.get_by_text("Edited · result-11.png · 128x128").wait_for()
    assert page.get_by_label("Edit", exact=True).is_checked()
    # The prompt box has the focus, ready for the next instruction.
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("now at night")
    second_answer = send(page, "Edit")
    assert ("image", "result-11.png", first) in sent_form(page)
    second = response_images(second_answer)[0]
    page.get_by_role("button", name="Edit this result").click()
    page.get_by_label("Prompt", exact=True).fill("add snow")
    send(page, "Edit")
    chained_seed = second_answer.json()["data"][0]["seed"]
    assert ("image", f"result-{chained_seed}.png", second) in sent_form(page)
    assert page.locator("#history > li").count() == 3


def test_paint_a_mask_over_the_image(page, open_server):
    source = picture(160, 128, seed=5)
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Image", exact=True).set_input_files(file_payload("room.png", source))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for()
    box = canvas.bounding_box()
    # One horizontal stroke across the middle of the picture, with the default 40-pixel brush.
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=8)
    page.mouse.up()
    assert "of the image will change" in page.locator("#mask-status").inner_text()
    fill(page, "a window here", seed=2)
    answer = send(page, "Edit")

    parts = {name: content for name, filename, content in sent_form(page) if filename}
    mask = decoded(parts["mask"])
    assert mask.format == "PNG" and mask.size == (160, 128) and "A" in mask.getbands()
    alpha = np.asarray(mask.getchannel("A"))
    middle = round(128 / 2)
    assert alpha[middle, 40:120].max() == 0  # painted: fully transparent, the area to change
    assert alpha[:20].min() == 255 and alpha[-20:].min() == 255  # untouched: opaque, kept
    # The server keeps every pixel away from the painted band exactly as it was.
    result = np.asarray(decoded(response_images(answer)[0]).convert("RGB"))
    original = np.asarray(decoded(source).convert("RGB"))
    assert result.shape == original.shape
    assert np.array_equal(result[:20], original[:20]) and np.array_equal(result[-20:], original[-20:])
    assert not np.array_equal(result[middle - 5 : middle + 5], original[middle - 5 : middle + 5])

    # Clearing the mask sends none.
    page.get_by_role("button", name="Clear mask").click()
    assert page.locator("#mask-status").inner_text().startswith("No mask")
    send(page, "Edit")
    assert "mask" not in {name for name, _, _ in sent_form(page)}


def test_several_reference_images(page, open_server):
    first, second = picture(112, 80, seed=1), picture(64, 64, seed=2)
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Image", exact=True).set_input_files(
        [file_payload("subject.png", first), file_payload("style.png", second)]
    )
    page.get_by_text("Reference · style.png · 64x64").wait_for()
    fill(page, "the subject in the style of image 2", seed=4)
    send(page, "Edit")
    images = [(name, filename, content) for name, filename, content in sent_form(page) if filename]
    assert images == [("image[]", "subject.png", first), ("image[]", "style.png", second)]
    assert result_sizes(page) == [[112, 80]]
    # Removing the first makes the other the edited one.
    page.get_by_role("button", name="Remove subject.png").click()
    page.get_by_text("Edited · style.png · 64x64").wait_for()


def test_drop_and_paste_add_images(page, open_server):
    page.get_by_label("Edit", exact=True).check()
    data = base64.b64encode(picture(80, 80, seed=9)).decode()
    make_transfer = """([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        return transfer;
    }"""
    dropped = page.evaluate_handle(make_transfer, [data, "dropped.png"])
    page.dispatch_event("#inputs", "drop", {"dataTransfer": dropped})
    page.get_by_text("Edited · dropped.png · 80x80").wait_for()
    page.evaluate(
        f"""([b64, name]) => document.dispatchEvent(new ClipboardEvent("paste",
            {{clipboardData: ({make_transfer})([b64, name]), bubbles: true}}))""",
        [data, "pasted.png"],
    )
    page.get_by_text("Reference · pasted.png · 80x80").wait_for()
    # Text pasted into the prompt stays ordinary pasting.
    assert page.get_by_label("Prompt", exact=True).input_value() == ""


def test_partial_images_arrive_before_the_result(page, open_server):
    # Record every picture the page shows in the results area, however briefly.
    page.evaluate(
        """() => {
        window.shown = [];
        new MutationObserver(() => {
            for (const img of document.querySelectorAll("#results img")) {
                if (window.shown.at(-1) !== img.alt) window.shown.push(img.alt);
            }
        }).observe(document.getElementById("results"), {subtree: true, childList: true, attributes: true});
    }"""
    )
    fill(page, "a storm at sea", seed=21, steps=6, previews=2)
    assert page.get_by_label("Live previews").input_value() == "2"
    answer = send(page)
    sent = answer.request.post_data_json
    assert sent["stream"] is True and sent["partial_images"] == 2
    events = sse_events(answer.text())
    kinds = [event["type"] for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    shown = page.evaluate("window.shown")
    assert shown[:2] == ["Preview 1, still being made", "Preview 2, still being made"]
    assert shown[-1] == "Result 1 of 1, seed 21: a storm at sea"
    # Streamed: a stream's headers leave before the work is done, so the stages come with the completed event
    # (previews among them), and the page adds when the first preview arrived.
    timings = events[-1]["timings"]
    assert timings["previews"] > 0
    timing = page.locator("#results .timing")
    order = ["queue", "encode_prompt", "denoise", "previews", "decode", "encode_image", "total"]
    assert timing.locator(".timing-list dt").all_inner_texts() == [stage for stage in order if stage in timings]
    assert timing.locator(".timing-list dd").first.inner_text() == f"{timings['queue']:.1f} ms"
    assert "first preview after" in timing.inner_text()

    # Several images: previews and results for each, in order.
    page.evaluate("window.shown = []")
    page.get_by_label("Images (n)").fill("2")
    page.get_by_label("Live previews").select_option("1")
    answer = send(page, count=2)
    events = sse_events(answer.text())
    assert [(event["type"].split(".")[1], event["image_index"]) for event in events] == [
        ("partial_image", 0),
        ("partial_image", 1),
        ("completed", 0),
        ("completed", 1),
    ]
    shown = page.evaluate("window.shown")
    assert "Preview 1 of image 1, still being made" in shown and "Preview 1 of image 2, still being made" in shown
    assert page.locator("#results .seed-value").all_inner_texts() == ["21", "22"]
    assert result_sizes(page) == [[128, 128], [128, 128]]


def test_a_bad_field_is_explained_in_words(page, page_problems):
    page_problems.expected_http_errors = True
    fill(page, "a cat", steps=99)
    with page.expect_response(lambda response: "/v1/images/" in response.url) as answer:
        page.get_by_role("button", name="Generate").click()
    assert answer.value.status == 400
    error = page.get_by_role("alert").filter(has_text="refused")
    error.wait_for()
    assert error.inner_text().startswith(
        "The server refused the request: steps must be an integer between 1 and 50, got 99. (field: steps)"
    )
    steps = page.get_by_label("Steps")
    assert steps.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "steps"
    assert page.locator("#history .history-error").inner_text().startswith("The server refused the request")
    # Fixing the field clears the error on the next request.
    steps.fill("2")
    send(page)
    assert page.locator("#error").is_hidden() and steps.get_attribute("aria-invalid") is None


def outstanding(http: httpx.Client) -> float:
    """Image requests queued or running on the server."""
    return metric(http, "stepimage_in_flight") + metric(http, "stepimage_queue_depth")


def test_cancel_stops_the_work_on_the_server(page, open_server):
    with httpx.Client(base_url=open_server.base_url) as http:
        before = metric(http, "stepimage_cancellations_total")
        # The largest served size at many steps takes seconds on the tiny CPU model: long enough to cancel.
        fill(page, "a slow one", steps=50, size="1024x1024")
        page.get_by_role("button", name="Generate").click()
        page.get_by_role("button", name="Cancel").click()
        page.get_by_text("Cancelled: the server stops the work").wait_for()
        assert page.locator("#history .history-error").inner_text() == "Cancelled."
        wait_for(lambda: metric(http, "stepimage_cancellations_total") > before, timeout=30)
        # The job stops at its next step; then the server is idle again.
        wait_for(lambda: outstanding(http) == 0, timeout=60)
    assert page.get_by_role("button", name="Generate").is_enabled()


def occupy(base_url: str, count: int) -> list[socket.socket]:
    """`count` slow generations sent over raw sockets, so that closing a socket is a client going away."""
    host, port = base_url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "keep busy", "size": "1024x1024", "steps": 50}).encode()
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connections = []
    for _ in range(count):
        connection = socket.create_connection((host, int(port)))
        connection.sendall(head + body)
        connections.append(connection)
    return connections


def test_a_full_queue_says_when_to_retry(page, open_server, page_problems):
    page_problems.expected_http_errors = True
    with httpx.Client(base_url=open_server.base_url) as http:
        # Work left by an earlier test (a cancelled job runs until its next step) would free a slot mid-test.
        wait_for(lambda: outstanding(http) == 0, timeout=60)
        rejected = metric(http, "stepimage_rejections_total")
        busy = occupy(open_server.base_url, OPEN_MAX_QUEUE)
        try:
            wait_for(lambda: outstanding(http) == OPEN_MAX_QUEUE, timeout=30)
            assert metric(http, "stepimage_rejections_total") == rejected  # both were accepted: the queue is full
            fill(page, "one too many")
            with page.expect_response(lambda response: "/v1/images/" in response.url) as answer:
                page.get_by_role("button", name="Generate").click()
            assert answer.value.status == 429
            retry_after = int(answer.value.headers["retry-after"])
            message = page.get_by_role("alert").filter(has_text="busy")
            message.wait_for()
            assert message.inner_text().startswith("The server is busy: ")
            unit = "second" if retry_after == 1 else "seconds"
            assert f"Try again in {retry_after} {unit}." in message.inner_text()
        finally:
            for connection in busy:
                connection.close()
        wait_for(lambda: outstanding(http) == 0, timeout=60)


def test_the_key_prompt_on_a_keyed_server(new_page, keyed_server, page_problems):
    page_problems.expected_http_errors = True
    page = new_page(keyed_server.base_url)
    key_box = page.get_by_label("API key", exact=True)
    key_box.wait_for()
    assert page.evaluate("document.activeElement.id") == "api-key"
    key_box.fill("wrong")
    page.get_by_role("button", name="Use key").click()
    page.get_by_text("The API key was not accepted: Incorrect API key provided.").wait_for()
    assert page.evaluate("sessionStorage.length") == 0

    key_box.fill(KEY)
    page.get_by_role("button", name="Use key").click()
    key_box.wait_for(state="hidden")
    assert page.evaluate("sessionStorage.getItem('stepimage.apiKey')") == KEY
    fill(page, "a keyed picture", seed=1)
    answer = send(page)
    assert answer.request.headers["authorization"] == f"Bearer {KEY}"
    # The key is kept for this tab only: a reload keeps it, a new tab does not have it.
    page.reload()
    page.get_by_role("button", name="Forget API key").wait_for()
    assert key_box.is_hidden()
    other = new_page(keyed_server.base_url)
    other.get_by_label("API key", exact=True).wait_for()

    # A 401 (say, the operator revoked the key) brings the prompt back: a real request with a key the server refuses.
    page.route(
        "**/v1/images/generations",
        lambda route: route.continue_(headers={**route.request.headers, "authorization": "Bearer revoked"}),
    )
    fill(page, "another", seed=1)
    with page.expect_response(lambda response: "/v1/images/" in response.url) as answer:
        page.get_by_role("button", name="Generate").click()
    assert answer.value.status == 401
    key_box.wait_for()
    assert "The API key was not accepted" in page.locator("#key-message").inner_text()
    assert page.evaluate("sessionStorage.length") == 0


def test_every_control_is_labelled_and_reachable_by_keyboard(page):
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Image", exact=True).set_input_files(file_payload("a.png", picture(64, 64)))
    page.get_by_text("Edited · a.png").wait_for()
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button, canvas")]
            .filter(el => el.getClientRects().length)
            .filter(el => {
                if (el.tagName === "BUTTON") return !el.innerText.trim();
                if (el.tagName === "CANVAS") return !document.getElementById(el.getAttribute("aria-labelledby"));
                const label = el.labels && el.labels[0];
                return !label || !label.innerText.trim() || !label.getClientRects().length;
            })
            .map(el => el.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []

    page.get_by_label("Text to image").check()
    page.get_by_role("button", name="Generate").wait_for()
    page.evaluate("document.activeElement.blur()")
    # Tab from the top of the page reaches the prompt; Ctrl+Enter sends.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "prompt":
            break
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.type("keyboard only")
    page.get_by_label("Size (H x W)").select_option(SMALL)
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Prompt", exact=True).focus()
    with page.expect_response(lambda response: "/v1/images/" in response.url):
        page.keyboard.press("Control+Enter")
    page.locator(RESULTS).first.wait_for()
    page.get_by_role("button", name="Edit this result").focus()
    page.keyboard.press("Enter")
    page.get_by_role("button", name="Edit", exact=True).wait_for()
    assert page.get_by_label("Edit", exact=True).is_checked()


def test_fits_a_phone(new_page, open_server):
    page = new_page(open_server.base_url, PHONE)
    fill(page, "a small screen", seed=5)
    send(page)
    page.get_by_role("button", name="Edit this result").click()
    page.get_by_text("Edited · result-5.png").wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    result = page.locator(RESULTS).first.bounding_box()
    assert result["x"] >= 0 and result["x"] + result["width"] <= PHONE["width"]
