"""What the browser tests do to the page and read back from it: fill the form, send, read the requests the page
made and the answers it got, and build input pictures."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from tests.browser.conftest import SMALL

RESULTS = "#results img[alt^='Result']"
API_CALL = "/v1/images/"


def picture(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth, recognisable RGB PNG (gradients plus a few blocks), so that kept pixels are easy to compare."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    for _ in range(4):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def file_payload(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": data}


def fill(page, prompt: str, *, seed: int | None = None, steps: int | None = 2, size: str = SMALL, previews: int = 0):
    """Fill the common fields. Previews default to off so the answer is one JSON body with a server-timing header."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    if seed is not None:
        page.get_by_label("Seed").fill(str(seed))
    if steps is not None:
        page.get_by_label("Steps").fill(str(steps))
    if page.get_by_label("Size (H x W)").is_visible():
        page.get_by_label("Size (H x W)").select_option(size)
    live = page.get_by_label("Live previews")
    if live.is_visible():
        live.select_option(str(previews))


def send(page, button: str = "Generate", count: int = 1):
    """Click the main button; wait for the page's API call and for `count` result images. Returns the response."""
    with page.expect_response(lambda response: API_CALL in response.url) as answer:
        page.get_by_role("button", name=button, exact=True).click()
    page.locator(RESULTS).nth(count - 1).wait_for()
    return answer.value


def response_images(response) -> list[bytes]:
    """The images of an image response, JSON or server-sent events, as file bytes."""
    if response.headers["content-type"].startswith("text/event-stream"):
        items = [event for event in sse_events(response.text()) if event["type"].endswith(".completed")]
    else:
        items = response.json()["data"]
    return [base64.b64decode(item["b64_json"]) for item in items]


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


# Chromium does not show a test the file parts of a multipart request it sends (they are blobs, not bytes in
# memory), so every page records the FormData it hands to fetch: names, file names and bytes, in order.
RECORD_FORMS = """(() => {
    const send = window.fetch;
    window.sentForms = [];
    window.fetch = async (input, init = {}) => {
        if (init.body instanceof FormData) {
            const parts = [];
            for (const [name, value] of init.body.entries()) {
                const bytes = typeof value === "string"
                    ? new TextEncoder().encode(value) : new Uint8Array(await value.arrayBuffer());
                let binary = "";
                for (const byte of bytes) binary += String.fromCharCode(byte);
                parts.push([name, typeof value === "string" ? null : value.name, btoa(binary)]);
            }
            window.sentForms.push(parts);
        }
        return send(input, init);
    };
})();"""


def sent_form(page) -> list[tuple[str, str | None, bytes]]:
    """(name, file name or None, content) of each part of the last multipart request the page sent, in order."""
    parts = page.evaluate("window.sentForms.at(-1)")
    return [(name, filename, base64.b64decode(content)) for name, filename, content in parts]


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def result_sizes(page) -> list[tuple[int, int]]:
    return page.eval_on_selector_all(RESULTS, "imgs => imgs.map(img => [img.naturalWidth, img.naturalHeight])")
