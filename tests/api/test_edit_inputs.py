"""Edits with several reference images and a mask, in every shape clients send them, and the ways they go wrong."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import assert_error
from tests.conftest import decode_png, image_bytes

pytestmark = pytest.mark.api

EDITS = "/v1/images/edits"
FIELDS = {"prompt": "put the hat from image 2 on the cat in image 1", "steps": "2", "seed": "3"}
JSON_FIELDS = {"prompt": "combine", "steps": 2, "seed": 3, "response_format": "b64_json"}


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def mask_png(width: int, height: int, box=(8, 8, 24, 24), mode: str = "RGBA") -> bytes:
    """A mask: opaque everywhere except the transparent `box` (the area to change)."""
    alpha = np.full((height, width), 255, dtype=np.uint8)
    x0, y0, x1, y1 = box
    alpha[y0:y1, x0:x1] = 0
    picture = Image.new("RGB", (width, height), (0, 0, 0))
    picture.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    picture.convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def sizes(picture_list) -> list[tuple[int, int]]:
    return [picture.size for picture in picture_list]


# -- several images --------------------------------------------------------------------------------


def test_repeated_image_parts_become_the_edited_image_and_references(make_client, gated):
    client = make_client(backend=gated)
    files = [
        ("image[]", ("a.png", image_bytes(96, 64), "image/png")),
        ("image[]", ("b.png", image_bytes(64, 80, seed=1), "image/png")),
        ("image", ("c.png", image_bytes(72, 72, seed=2), "image/png")),
    ]
    response = client.post(EDITS, data={**FIELDS, "response_format": "b64_json"}, files=files)
    assert response.status_code == 200, response.text
    request = gated.requests[-1]
    assert request.image.size == (96, 64)
    assert sizes(request.references) == [(64, 80), (72, 72)]
    # The result has the first image's size.
    assert decode_png(base64.b64decode(response.json()["data"][0]["b64_json"])).size == (96, 64)


def test_base64_text_parts_and_files_keep_their_order(make_client, gated):
    client = make_client(backend=gated)
    files = [
        ("image", (None, data_url(image_bytes(80, 64)))),
        ("image", ("b.png", image_bytes(64, 64, seed=1), "image/png")),
    ]
    assert client.post(EDITS, data=FIELDS, files=files).status_code == 200
    assert [gated.requests[-1].image.size, *sizes(gated.requests[-1].references)] == [(80, 64), (64, 64)]


@pytest.mark.parametrize("shape", ["image_list", "openai_images"])
def test_json_bodies_carry_several_images(make_client, gated, shape):
    client = make_client(backend=gated)
    urls = [data_url(image_bytes(96, 64)), data_url(image_bytes(64, 64, seed=1))]
    body = dict(JSON_FIELDS)
    if shape == "image_list":
        body["image"] = urls
    else:
        body["images"] = [{"image_url": url} for url in urls]
    response = client.post(EDITS, json=body)
    assert response.status_code == 200, response.text
    assert gated.requests[-1].image.size == (96, 64)
    assert sizes(gated.requests[-1].references) == [(64, 64)]
    usage = response.json()["usage"]
    # 96x64 is 6x4 latent tokens, 64x64 is 4x4.
    assert usage["input_tokens_details"]["image_tokens"] == 24 + 16


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"image": "x", "images": [{"image_url": "y"}]}, "images", "not both"),
        ({"images": [{"file_id": "file-123"}]}, "images", "images[0].file_id refers to a file uploaded to"),
        ({"images": [{"image_url": "x"}, {}]}, "images", "images[1].image_url is required"),
        ({"images": []}, "image", "required"),
        ({"images": "data:image/png;base64,xx"}, "images", "images must be an array of objects"),
        ({"image": [1, 2]}, "image", "image[0] must be a base64-encoded image"),
        ({"mask": {"file_id": "file-1"}}, "mask", "mask.file_id refers to a file uploaded to"),
    ],
)
def test_bad_json_image_shapes(client, body, param, words):
    error = assert_error(client.post(EDITS, json={**JSON_FIELDS, **body}), 400, param)
    if words:
        assert words in error["message"]


def test_a_broken_second_image_is_named_by_its_position(client):
    files = [
        ("image[]", ("a.png", image_bytes(64, 64), "image/png")),
        ("image[]", ("b.png", b"not an image", "image/png")),
    ]
    error = assert_error(client.post(EDITS, data=FIELDS, files=files), 400, "image")
    assert "input image 2 of 2" in error["message"]


@pytest.mark.parametrize(
    ("second", "words"),
    [("https://example.com/b.png", "not a URL"), ("not base64!", "base64"), ("data:text/plain;base64,eA==", "data")],
)
def test_a_second_image_that_is_not_base64_is_named_by_its_position(client, second, words):
    body = {**JSON_FIELDS, "image": [data_url(image_bytes(64, 64)), second]}
    error = assert_error(client.post(EDITS, json=body), 400, "image")
    assert error["message"].startswith("input image 2 of 2: ") and words in error["message"], error


def test_more_images_than_the_limit_are_refused_before_decoding(make_client):
    client = make_client(max_edit_images=2)
    urls = [data_url(image_bytes(64, 64, seed=index)) for index in range(3)]
    error = assert_error(client.post(EDITS, json={**JSON_FIELDS, "image": urls}), 400, "image")
    assert "at most 2" in error["message"]


@pytest.mark.parametrize("limit", [4, 20])
def test_the_form_file_limit_follows_max_edit_images(make_client, limit):
    client = make_client(max_edit_images=limit)
    picture = image_bytes(64, 64)

    def form_with(count: int):
        files = [("image[]", (f"{index}.png", picture, "image/png")) for index in range(count)]
        return client.post(EDITS, data=FIELDS, files=files)

    # One file over the image limit could be the mask: the form is read, and the images are counted.
    error = assert_error(form_with(limit + 1), 400, "image")
    assert error["message"] == f"at most {limit} input images are accepted per edit, got {limit + 1}"
    # More files than images and a mask: refused while reading the form, in the same words.
    error = assert_error(form_with(limit + 2), 400, "image")
    assert error["message"] == (
        f"at most {limit} input images are accepted per edit, plus one mask; this form has more than {limit + 1} files"
    )


def test_images_as_a_form_field_is_refused(client):
    files = [("image", ("a.png", image_bytes(64, 64), "image/png"))]
    assert_error(client.post(EDITS, data={**FIELDS, "images": "x"}, files=files), 400, "images")


def test_requests_with_the_same_reference_sizes_batch_and_others_do_not(tiny_backend):
    from pipelines.base import GenerationRequest

    def edit(*reference_sizes):
        references = tuple(Image.new("RGB", size) for size in reference_sizes)
        return GenerationRequest(prompt="x", seed=1, steps=1, image=Image.new("RGB", (96, 64)), references=references)

    key = tiny_backend.batch_key
    assert key(edit((64, 64))) == key(edit((64, 64)))
    assert key(edit((64, 64))) != key(edit((64, 128)))
    assert key(edit((64, 64))) != key(edit())


# -- masks -----------------------------------------------------------------------------------------


def test_a_mask_part_reaches_the_pipeline_as_the_area_to_change(make_client, gated):
    client = make_client(backend=gated)
    files = [
        ("image", ("a.png", image_bytes(96, 64), "image/png")),
        ("mask", ("m.png", mask_png(96, 64, box=(8, 4, 24, 20)), "image/png")),
    ]
    assert client.post(EDITS, data=FIELDS, files=files).status_code == 200
    mask = np.array(gated.requests[-1].mask)
    assert gated.requests[-1].mask.mode == "L" and mask.shape == (64, 96)
    assert (mask[4:20, 8:24] == 255).all()
    mask[4:20, 8:24] = 0
    assert not mask.any()


@pytest.mark.parametrize("shape", ["string", "image_url"])
def test_json_masks(make_client, gated, shape):
    client = make_client(backend=gated)
    url = data_url(mask_png(64, 64))
    body = {
        **JSON_FIELDS,
        "image": data_url(image_bytes(64, 64)),
        "mask": url if shape == "string" else {"image_url": url},
    }
    assert client.post(EDITS, json=body).status_code == 200, body
    assert gated.requests[-1].mask is not None


def test_a_masked_edit_returns_the_input_pixels_outside_the_feather(client):
    source = image_bytes(96, 64, seed=5)
    files = [
        ("image", ("a.png", source, "image/png")),
        ("mask", ("m.png", mask_png(96, 64, box=(40, 20, 60, 40)), "image/png")),
    ]
    response = client.post(EDITS, data={**FIELDS, "response_format": "b64_json"}, files=files)
    assert response.status_code == 200, response.text
    out = np.asarray(decode_png(base64.b64decode(response.json()["data"][0]["b64_json"])).convert("RGB"))
    original = np.asarray(decode_png(source).convert("RGB"))
    # The feather is 4 working pixels wide on each side, the ramp twice that; this input is its own working size.
    outside = np.ones((64, 96), dtype=bool)
    outside[20 - 8 : 40 + 8, 40 - 8 : 60 + 8] = False
    assert np.array_equal(out[outside], original[outside])
    assert not np.array_equal(out[20:40, 40:60], original[20:40, 40:60])


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        # Sizes written HEIGHTxWIDTH, as everywhere in the API: the mask is 96 wide and 64 high.
        (lambda: mask_png(96, 64), "mask is 64x96 (HEIGHTxWIDTH), but the image is 64x64; the mask must"),
        (lambda: mask_png(64, 96), "mask is 96x64 (HEIGHTxWIDTH), but the image is 64x64"),
        (lambda: image_bytes(64, 64), "no alpha"),
        (lambda: mask_png(64, 64, box=(0, 0, 0, 0)), "no fully transparent"),
        (lambda: b"\x89PNG\r\n\x1a\n not really", "not a supported image"),
        (lambda: mask_png(64, 64, mode="LA"), None),  # grey + alpha is a fine mask
    ],
)
def test_bad_masks_are_400s_naming_mask(client, mask, words):
    files = [("image", ("a.png", image_bytes(64, 64), "image/png")), ("mask", ("m.png", mask(), "image/png"))]
    response = client.post(EDITS, data=FIELDS, files=files)
    if words is None:
        assert response.status_code == 200, response.text
        return
    error = assert_error(response, 400, "mask")
    assert words in error["message"]


def test_two_masks_are_refused(client):
    files = [
        ("image", ("a.png", image_bytes(64, 64), "image/png")),
        ("mask", ("m.png", mask_png(64, 64), "image/png")),
        ("mask", ("n.png", mask_png(64, 64), "image/png")),
    ]
    assert_error(client.post(EDITS, data=FIELDS, files=files), 400, "mask")


# -- how multipart bodies go wrong -----------------------------------------------------------------


def test_a_misnamed_file_part_is_told_that_image_is_missing(client):
    files = [("file", ("in.png", image_bytes(64, 64), "image/png"))]
    error = assert_error(client.post(EDITS, data=FIELDS, files=files), 400, "image", "missing_required_parameter")
    assert '"file"' in error["message"] and "named image" in error["message"]


def multipart(parts: list[tuple[str, bytes]], *, close: bool = True) -> tuple[bytes, str]:
    boundary = "stepimage-test-boundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        for name, value in parts
    )
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_invalid_utf8_in_a_multipart_text_part_is_a_400_as_in_json(client):
    image = "data:image/png;base64," + base64.b64encode(image_bytes(64, 64)).decode()
    body, content_type = multipart([("prompt", b"caf\xe9 \xff"), ("image", image.encode())])
    error = assert_error(client.post(EDITS, content=body, headers={"content-type": content_type}), 400, "prompt")
    assert "utf-8" in error["message"]
    json_like = client.post(EDITS, content=b'{"prompt": "caf\xe9"}', headers={"content-type": "application/json"})
    assert_error(json_like, 400, None, "invalid_json")


@pytest.mark.parametrize("charset", ["rot13", "hex", "base64", "uu", "punycode", "utf-16", "no-such-charset"])
def test_a_charset_that_is_no_ascii_compatible_text_encoding_is_a_400_naming_it(client, charset):
    image = data_url(image_bytes(64, 64))
    body, content_type = multipart([("prompt", b"a cat"), ("image", image.encode())])
    headers = {"content-type": f"{content_type}; charset={charset}"}
    error = assert_error(client.post(EDITS, content=body, headers=headers), 400, None, "invalid_multipart")
    assert f'charset "{charset}" is not a text encoding this server reads' in error["message"]


def test_a_long_charset_is_quoted_bounded(client):
    body, content_type = multipart([("prompt", b"a cat")])
    headers = {"content-type": f"{content_type}; charset={'x' * 500}"}
    error = assert_error(client.post(EDITS, content=body, headers=headers), 400, None, "invalid_multipart")
    assert "(500 characters)" in error["message"] and "x" * 100 not in error["message"]


def test_text_the_charset_cannot_decode_is_a_400_naming_the_field(client):
    # IDNA reads ASCII as itself, but refuses a label that does not round-trip (a plain UnicodeError).
    body, content_type = multipart([("prompt", b"xn--a-")])
    headers = {"content-type": f"{content_type}; charset=idna"}
    error = assert_error(client.post(EDITS, content=body, headers=headers), 400, "prompt")
    assert "is not valid idna text" in error["message"]
    # The same in a part's name, which the parser decodes before any field exists.
    body, content_type = multipart([("xn--a-", b"x")])
    headers = {"content-type": f"{content_type}; charset=idna"}
    error = assert_error(client.post(EDITS, content=body, headers=headers), 400, None, "invalid_multipart")
    assert "header is not valid idna text" in error["message"]


def test_a_latin1_multipart_body_is_read_in_its_charset(make_client, gated):
    client = make_client(backend=gated)
    body, content_type = multipart(
        [("prompt", "café".encode("latin-1")), ("image", data_url(image_bytes(64, 64)).encode())]
    )
    headers = {"content-type": f"{content_type}; charset=iso-8859-1"}
    assert client.post(EDITS, content=body, headers=headers).status_code == 200
    assert gated.requests[-1].prompt == "café"


def test_valid_utf8_in_multipart_is_kept(make_client, gated):
    client = make_client(backend=gated)
    image = "data:image/png;base64," + base64.b64encode(image_bytes(64, 64)).decode()
    body, content_type = multipart([("prompt", "café 猫".encode()), ("image", image.encode())])
    assert client.post(EDITS, content=body, headers={"content-type": content_type}).status_code == 200
    assert gated.requests[-1].prompt == "café 猫"


def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(client):
    image = "data:image/png;base64," + base64.b64encode(image_bytes(64, 64)).decode()
    body, content_type = multipart([("prompt", b"x"), ("image", image.encode())], close=False)
    error = assert_error(client.post(EDITS, content=body, headers={"content-type": content_type}), 400, None)
    assert "closing boundary" in error["message"]


def test_invalid_utf8_in_a_url_encoded_form_is_refused(client):
    response = client.post(
        EDITS, content=b"prompt=caf%E9&image=abc", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert_error(response, 400, None)
