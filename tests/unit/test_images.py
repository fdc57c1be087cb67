"""Unit tests for server.images: upload decoding rules, base64 fields and output encoding.

Every image is built in memory; the only crafted-by-hand files are PNGs whose header lies about their size.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from server.errors import InvalidRequest
from server.images import (
    DEFAULT_QUALITY,
    MAX_SIDE,
    MIN_SIDE,
    OUTPUT_FORMATS,
    decode_base64_image,
    decode_image,
    encode_image,
    file_extension,
    media_type,
)

pytestmark = pytest.mark.unit

RED = (255, 0, 0)
SERVER_DETAILS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/(?:usr|home|work|tmp|opt|srv)/|0x[0-9a-f]{6,}")
BLUE = (0, 0, 255)


# --- builders -----------------------------------------------------------------------------------------------------


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def blocks_image(width: int = 96, height: int = 80) -> Image.Image:
    """Four flat quadrants: few colours (GIF-safe) and easy to compare after lossy codecs."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2 :] = (0, 255, 0)
    array[height // 2 :, : width // 2] = BLUE
    array[height // 2 :, width // 2 :] = (255, 255, 0)
    return Image.fromarray(array)


def noise_image(width: int = 128, height: int = 128, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def marked_image(width: int, height: int) -> Image.Image:
    """Blue with a red square in the stored top-left corner, to see where orientation moves it."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    return image


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def greyscale_png(width: int, height: int, *, full_stream: bool) -> bytes:
    """An 8-bit greyscale all-black PNG declaring width x height.

    With full_stream the IDAT really holds every row (zeros compress ~1000:1, built row by row so the test itself
    stays small); without it the IDAT holds one row, which is enough for any reader that trusts the header.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = bytes(width + 1)  # filter byte + samples
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height if full_stream else 1)]
    parts.append(compressor.flush())
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", png_chunk(b"IHDR", header), png_chunk(b"IDAT", b"".join(parts)), png_chunk(b"IEND", b"")]
    )


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    return save(image, fmt, exif=exif.tobytes(), **options)


def assert_invalid(excinfo: pytest.ExceptionInfo[InvalidRequest], param: str = "image") -> str:
    error = excinfo.value
    assert error.param == param
    assert error.status == 400
    assert error.type == "invalid_request_error"
    assert not SERVER_DETAILS.search(error.message), error.message
    return error.message


def close_to(pixel, expected, tolerance: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


# --- decode_image: formats ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_lossless_formats_round_trip_exactly(fmt):
    source = blocks_image()
    result = decode_image(save(source, fmt))
    assert result.mode == "RGB"
    assert result.size == source.size
    assert np.array_equal(np.asarray(result), np.asarray(source))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_round_trip_closely(fmt):
    source = blocks_image()
    result = decode_image(save(source, fmt, quality=95))
    assert result.mode == "RGB"
    assert result.size == source.size
    difference = np.abs(np.asarray(result, dtype=np.int16) - np.asarray(source, dtype=np.int16))
    assert difference.mean() < 4


def test_result_is_a_plain_loaded_image_without_metadata():
    data = with_orientation(blocks_image(), "JPEG", 1)
    result = decode_image(data)
    # Not a file-backed ImageFile: nothing refers back to the upload buffer.
    assert not isinstance(result, ImageFile.ImageFile)
    assert result.info == {}
    assert result.getpixel((0, 0)) is not None


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    result = decode_image(data)
    assert not isinstance(result, ImageFile.ImageFile)
    assert result.getpixel((10, 10)) == RED


def test_animated_webp_gives_first_frame():
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    data = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert close_to(decode_image(data).getpixel((10, 10)), RED, tolerance=2)


# --- decode_image: EXIF orientation -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_orientation_6_rotates_clockwise(fmt):
    # Stored 100 wide x 64 high; orientation 6 means "turn 90 degrees clockwise to display", so the displayed image
    # is 64 x 100 and the stored top-left corner ends up top-right.
    result = decode_image(with_orientation(marked_image(100, 64), fmt, 6))
    assert result.size == (64, 100)
    assert close_to(result.getpixel((64 - 6, 5)), RED)
    assert close_to(result.getpixel((5, 5)), BLUE)
    assert close_to(result.getpixel((5, 100 - 6)), BLUE)


def test_orientation_8_rotates_counter_clockwise():
    result = decode_image(with_orientation(marked_image(100, 64), "JPEG", 8))
    assert result.size == (64, 100)
    assert close_to(result.getpixel((5, 100 - 6)), RED)
    assert close_to(result.getpixel((64 - 6, 5)), BLUE)


def test_orientation_3_turns_upside_down_without_changing_size():
    result = decode_image(with_orientation(marked_image(100, 64), "PNG", 3))
    assert result.size == (100, 64)
    assert result.getpixel((99, 63)) == RED
    assert result.getpixel((0, 0)) == BLUE


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_is_ignored_not_fatal():
    data = save(marked_image(80, 64), "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    result = decode_image(data)
    assert result.size == (80, 64)


def test_size_error_reports_the_oriented_size():
    # Stored 100x63 with orientation 6 is displayed 63 wide and 100 high.
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(with_orientation(marked_image(100, 63), "JPEG", 6))
    message = assert_invalid(excinfo)
    assert "63 pixels wide and 100 pixels high" in message


# --- decode_image: colour modes -----------------------------------------------------------------------------------


def test_rgba_is_composited_over_white():
    array = np.zeros((64, 64, 4), dtype=np.uint8)
    array[:, :32] = (255, 0, 0, 255)  # opaque red
    array[:, 32:48] = (255, 0, 0, 128)  # half-transparent red
    array[:, 48:] = (0, 0, 0, 0)  # fully transparent (black underneath)
    result = decode_image(save(Image.fromarray(array), "PNG"))
    assert result.mode == "RGB"
    assert result.getpixel((5, 5)) == RED
    assert close_to(result.getpixel((40, 5)), (255, 127, 127), tolerance=2)
    assert result.getpixel((60, 5)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_over_white(fmt):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 32, 64))
    result = decode_image(save(image, fmt, transparency=0))
    assert result.mode == "RGB"
    assert result.getpixel((5, 5)) == RED
    assert result.getpixel((50, 5)) == (255, 255, 255)


def test_greyscale_and_alpha_greyscale():
    assert decode_image(save(Image.new("L", (64, 64), 100), "PNG")).getpixel((3, 3)) == (100, 100, 100)
    result = decode_image(save(Image.new("LA", (64, 64), (0, 0)), "PNG"))
    assert result.getpixel((3, 3)) == (255, 255, 255)


def test_bilevel_and_cmyk_become_rgb():
    bilevel = decode_image(save(Image.new("1", (64, 64), 1), "BMP"))
    assert bilevel.mode == "RGB" and bilevel.getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode_image(save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk.mode == "RGB"
    assert close_to(cmyk.getpixel((5, 5)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    ramp = np.rint(np.linspace(0, 65535, 256)).astype(np.uint16)
    source = Image.fromarray(np.tile(ramp, (64, 1)))
    assert source.mode == "I;16"
    result = np.asarray(decode_image(save(source, fmt)))
    assert result.shape == (64, 256, 3)
    row = result[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255
    assert abs(int(np.median(row)) - 128) <= 2
    # Monotonic and roughly the identity on column index: a proper scale, not a saturated ramp.
    assert np.all(np.diff(row) >= 0)
    assert np.abs(row - np.arange(256)).max() <= 1


def test_float_tiff_in_unit_range_is_scaled():
    ramp = np.linspace(0.0, 1.0, 128, dtype=np.float32)
    result = np.asarray(decode_image(save(Image.fromarray(np.tile(ramp, (64, 1))), "TIFF")))
    assert result[0, 0, 0] == 0 and result[0, -1, 0] == 255


# --- decode_image: size limits and bombs --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(63, 100), (100, 63), (4097, 64), (64, 4097)])
def test_sides_outside_range_are_rejected(size):
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(save(Image.new("L", size, 0), "PNG"))
    message = assert_invalid(excinfo)
    assert f"{size[0]} pixels wide and {size[1]} pixels high" in message
    assert f"between {MIN_SIDE} and {MAX_SIDE}" in message


@pytest.mark.parametrize("size", [(64, 64), (64, 4096), (4096, 4096)])
def test_sides_at_the_limits_are_accepted(size):
    result = decode_image(save(Image.new("L", size, 7), "PNG", compress_level=1))
    assert result.size == size
    assert result.getpixel((size[0] - 1, size[1] - 1)) == (7, 7, 7)


def test_custom_limits_and_param_name():
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(save(Image.new("RGB", (32, 32)), "PNG"), param="mask", min_side=8, max_side=16)
    assert "between 8 and 16" in assert_invalid(excinfo, param="mask")
    assert decode_image(save(Image.new("RGB", (16, 8)), "PNG"), param="mask", min_side=8, max_side=16).size == (16, 8)


@pytest.mark.parametrize(
    ("width", "height", "full_stream"),
    [
        (5000, 5000, True),  # a genuine, complete file: only over MAX_SIDE
        (10000, 10000, False),  # above Pillow's warning threshold (MAX_IMAGE_PIXELS)
        (60000, 60000, False),  # above Pillow's hard limit (2 * MAX_IMAGE_PIXELS)
        (4096, 1_000_000, False),  # one side fine, the other absurd
    ],
)
def test_decompression_bombs_are_rejected_without_decoding(width, height, full_stream):
    data = greyscale_png(width, height, full_stream=full_stream)
    assert len(data) < 100_000
    filters_before = list(warnings.filters)
    images_before = Image.core.get_stats()["new_count"]
    tracemalloc.start()
    try:
        with warnings.catch_warnings(record=True) as caught, pytest.raises(InvalidRequest) as excinfo:
            warnings.simplefilter("always")
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_invalid(excinfo)
    # Pillow's bomb warning is turned into the 400 itself, not left to reach logs alongside it.
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert peak < 50 * 1024 * 1024
    # tracemalloc does not see Pillow's C allocations; its image counter shows no pixel buffer was ever created.
    assert Image.core.get_stats()["new_count"] == images_before
    assert warnings.filters == filters_before


# --- decode_image: bad bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected(fmt):
    data = save(noise_image(), fmt)
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(data[: len(data) // 2])
    assert "truncated or corrupt" in assert_invalid(excinfo)


def test_corrupt_png_checksum_is_rejected():
    data = bytearray(save(noise_image(), "PNG"))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(bytes(data))
    assert_invalid(excinfo)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"This is a plain text file, not a picture.\n" * 50,
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
    ],
    ids=["random", "text", "signature-only"],
)
def test_non_images_are_rejected(data):
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(data)
    assert "not a supported image" in assert_invalid(excinfo)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX"])
def test_formats_pillow_reads_but_we_do_not_accept(fmt):
    data = save(blocks_image(64, 64), fmt)
    with Image.open(io.BytesIO(data)) as sanity:  # Pillow itself would happily open it
        assert sanity.size == (64, 64)
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(data)
    assert "not a supported image" in assert_invalid(excinfo)


@pytest.mark.parametrize("data", [b"", bytearray()])
def test_empty_input_is_rejected(data):
    with pytest.raises(InvalidRequest) as excinfo:
        decode_image(data)
    assert "empty" in assert_invalid(excinfo)


def test_invalid_limits_are_a_programming_error():
    with pytest.raises(ValueError):
        decode_image(b"x", min_side=100, max_side=10)


# --- decode_base64_image ------------------------------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 3  # every byte value, so the encodings contain + / (or - _)


def test_plain_base64():
    assert decode_base64_image(base64.b64encode(PAYLOAD).decode()) == PAYLOAD


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", "DATA:Image/PNG;BASE64,", "  data:image/webp;base64,"])
def test_data_url(prefix):
    assert decode_base64_image(prefix + base64.b64encode(PAYLOAD).decode()) == PAYLOAD


def test_urlsafe_alphabet():
    text = base64.urlsafe_b64encode(PAYLOAD).decode()
    assert "-" in text and "_" in text
    assert decode_base64_image(text) == PAYLOAD


@pytest.mark.parametrize("length", [1, 2, 3, 767])
def test_missing_padding(length):
    text = base64.b64encode(PAYLOAD[:length]).decode().rstrip("=")
    assert decode_base64_image(text) == PAYLOAD[:length]
    assert decode_base64_image("data:image/png;base64," + text) == PAYLOAD[:length]


def test_whitespace_and_line_breaks_are_ignored():
    encoded = base64.b64encode(PAYLOAD).decode()
    wrapped = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert decode_base64_image(f"  \n{wrapped}\n\t ") == PAYLOAD
    assert decode_base64_image(base64.encodebytes(PAYLOAD).decode()) == PAYLOAD


def test_decoded_image_round_trip():
    png = save(blocks_image(), "PNG")
    text = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_image(decode_base64_image(text)).size == (96, 80)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not base64 at all!", "not valid base64"),
        ("abcde", "not valid base64"),  # a length no base64 string can have
        ("QQ==QQ==", "not valid base64"),  # padding in the middle
        ("aGVsbG8gd29ybGQ=\u00e9", "not valid base64"),
        ("", "empty"),
        ("   \n  ", "empty"),
        ("====", "not valid base64"),
        ("QQ===", "not valid base64"),  # more padding than base64 ever has
        ("data:image/png;base64,", "empty"),
        ("data:text/plain;base64,aGVsbG8=", "image/*"),
        ("data:;base64,aGVsbG8=", "image/*"),
        ("data:image/png,hello", "base64"),
        ("data:image/png;base64", "malformed data URL"),
        ("https://example.com/cat.png", "not a URL"),
    ],
)
def test_bad_base64_is_rejected(text, fragment):
    with pytest.raises(InvalidRequest) as excinfo:
        decode_base64_image(text)
    assert fragment in assert_invalid(excinfo)


@pytest.mark.parametrize("value", [None, 123, b"aGVsbG8="])
def test_non_string_is_rejected(value):
    with pytest.raises(InvalidRequest) as excinfo:
        decode_base64_image(value, param="image[]")
    assert_invalid(excinfo, param="image[]")


def test_large_input_decodes_without_per_line_objects():
    payload = np.random.default_rng(2).integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes()
    text = base64.encodebytes(payload).decode()  # MIME style: a newline every 76 characters
    tracemalloc.start()
    try:
        assert decode_base64_image(text) == payload
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A couple of input-sized buffers plus the result; splitting into ~55k line strings would cost far more.
    assert peak < 3 * len(text)


# --- encode_image -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_encode_decodes_back_to_same_size_and_mode(fmt):
    source = blocks_image(128, 96)
    data = encode_image(source, fmt)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert decoded.size == source.size
        assert decoded.mode == "RGB"
        if fmt == "png":
            assert np.array_equal(np.asarray(decoded), np.asarray(source))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_changes_size(fmt):
    image = noise_image(128, 128)
    assert len(encode_image(image, fmt, quality=20)) < len(encode_image(image, fmt, quality=95))
    assert encode_image(image, fmt) == encode_image(image, fmt, quality=DEFAULT_QUALITY)
    assert encode_image(image, fmt, quality=0) and encode_image(image, fmt, quality=100)


def test_png_rejects_quality():
    # ValueError, not InvalidRequest: output_compression is validated by the request layer, so a quality reaching
    # the PNG encoder is a server bug rather than a client error.
    with pytest.raises(ValueError):
        encode_image(blocks_image(), "png", quality=80)


@pytest.mark.parametrize("quality", [-1, 101, 50.0, True, "90"])
def test_quality_out_of_range_is_rejected(quality):
    with pytest.raises(ValueError):
        encode_image(blocks_image(), "jpeg", quality=quality)


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError):
        encode_image(blocks_image(), "gif")
    assert encode_image(blocks_image(), "PNG")[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_rgb_inputs_are_encodable():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 128))
    for fmt in OUTPUT_FORMATS:
        with Image.open(io.BytesIO(encode_image(rgba, fmt))) as decoded:
            assert decoded.size == (64, 64)
    with Image.open(io.BytesIO(encode_image(Image.new("I;16", (64, 64)), "jpeg"))) as decoded:
        assert decoded.mode == "RGB"


def test_media_types_and_extensions():
    assert [media_type(f) for f in OUTPUT_FORMATS] == ["image/png", "image/jpeg", "image/webp"]
    assert [file_extension(f) for f in OUTPUT_FORMATS] == ["png", "jpg", "webp"]
    with pytest.raises(ValueError):
        media_type("bmp")
    with pytest.raises(ValueError):
        file_extension("tiff")
