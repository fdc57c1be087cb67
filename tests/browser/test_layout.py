"""The page's layout at a laptop's and a phone's width, with an edit in progress (input image, painted mask,
result, history). The screenshots it takes are the ones in docs/: run with STEPIMAGE_SCREENSHOT_DIR=docs to
refresh them (README, "Playground")."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.browser.conftest import DESKTOP, PHONE
from tests.browser.helpers import RESULTS, file_payload, fill, send

pytestmark = pytest.mark.browser


def scene(width: int = 320, height: int = 240) -> bytes:
    """A simple landscape: sky, sun, hills and a lake, so an edit's input reads as a picture."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        draw.line([(0, y), (width, y)], fill=(90 + y // 4, 150 + y // 5, 230))
    draw.ellipse([width * 0.68, height * 0.12, width * 0.84, height * 0.33], fill=(255, 214, 90))
    shore = height * 0.7
    draw.polygon([(0, shore), (width * 0.3, height * 0.4), (width * 0.6, shore)], fill=(70, 130, 80))
    draw.polygon([(width * 0.4, shore), (width * 0.75, height * 0.45), (width, shore)], fill=(50, 110, 70))
    draw.rectangle([0, shore, width, height], fill=(60, 120, 190))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_small(png: bytes, path: Path) -> None:
    # A palette of 128 colours keeps a screenshot of UI (flat colours, text) near-identical at a fraction of the size.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    image.save(path, format="PNG", optimize=True)


def edit_in_progress(page, base_url: str) -> None:
    fill(page, "a lighthouse on a cliff at dusk", seed=42, steps=4)
    send(page)
    page.get_by_label("Edit", exact=True).check()
    page.get_by_label("Image", exact=True).set_input_files(file_payload("landscape.png", scene()))
    page.get_by_text("Edited · landscape.png").wait_for()
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.83)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.83, steps=6)
    page.mouse.up()
    fill(page, "put a small red boat on the lake", seed=7, steps=4)
    send(page, "Edit")


@pytest.mark.parametrize("name, viewport", [("desktop", DESKTOP), ("phone", PHONE)])
def test_layout_and_screenshots(new_page, open_server, tmp_path, name, viewport):
    page = new_page(open_server.base_url, viewport)
    edit_in_progress(page, open_server.base_url)

    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    controls = page.locator("#request-form").bounding_box()
    result = page.locator(RESULTS).first.bounding_box()
    if name == "desktop":
        # Side by side: the result is beside the form, and in view without scrolling.
        assert result["x"] >= controls["x"] + controls["width"]
        assert result["y"] < viewport["height"]
    else:
        # One column: the result comes below the form, and fits the screen's width.
        assert result["y"] >= controls["y"] + controls["height"]
        assert result["x"] >= 0 and result["x"] + result["width"] <= viewport["width"]

    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    target = Path(os.environ.get("STEPIMAGE_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"playground-{name}.png"
    save_small(page.screenshot(full_page=name == "phone"), path)
    width, height = Image.open(path).size
    assert width == viewport["width"] and height >= viewport["height"]
