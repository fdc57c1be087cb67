"""Turning client-supplied image bytes into model-ready pixels, and model output into response bytes.

This module owns: decoding base64 / data-URL image fields, the rules for which uploads are acceptable (formats,
side limits, decompression-bomb defence, colour-mode normalisation to RGB with EXIF orientation applied), and the
encoder settings for the output formats. Anything wrong with a client's image becomes an `InvalidRequest` naming the
field; misuse by server code (an unknown output format, a bad quality value) is a `ValueError`, because the request
layer is expected to have validated those fields already.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
import zlib

import numpy as np
from PIL import ExifTags, Image

from server.errors import InvalidRequest

MIN_SIDE = 64
MAX_SIDE = 4096
OUTPUT_FORMATS = ("png", "jpeg", "webp")

# Quality used for jpeg/webp when the request gives no output_compression.
DEFAULT_QUALITY = 90

# PNG: measured on this 2-core CPU, 1024x1024 RGB, median of 9 (ms / bytes):
#   level            noise             smooth (gradients + shapes + slight grain)
#   0 (stored)        70 / 3.15 MB      47 / 3.15 MB
#   1                123 / 3.15 MB      72 / 1.20 MB
#   2                118 / 3.15 MB      77 / 1.19 MB
#   3                107 / 3.15 MB      99 / 1.17 MB
#   6 (Pillow dflt)  117 / 3.15 MB     240 / 0.99 MB
#   1 + Z_RLE         82 / 3.15 MB      58 / 0.97 MB
# Z_RLE suits PNG's filtered rows (long runs of small residuals) and ends up both the fastest setting that still
# compresses and smaller than level 6. `compress_type` is read by Pillow's PNG writer but is not a documented option;
# if a future Pillow ignored it the output would still be a valid PNG, just the plain level-1 numbers above, and
# benchmarks/encode_bench.py would show it.
PNG_SAVE_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE, "optimize": False}

# WebP at quality 90, same images (ms / bytes): method 0: 94 / 891 KB and 16 / 31.8 KB; method 1: 129 / 890 KB and
# 23 / 30.7 KB; method 2: 127 / 1.69 MB and 22 / 30.6 KB; method 3: 167 / 877 KB and 56 / 29.1 KB; method 4
# (libwebp default): 168 / 877 KB and 57 / 29.1 KB. PSNR on the smooth image is 37.6 dB for methods 0-2 and 37.7 dB
# for 3-4, so the effort above method 0 buys a few percent of size for up to 3.5x the time.
WEBP_METHOD = 0

_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}

# Pillow plugins allowed to parse uploads. Restricting the list means bytes in other formats (EPS, which would
# shell out to Ghostscript; PSD; ICO; ...) are never handed to those parsers at all.
_ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_UNSUPPORTED = "{param} is not a supported image; send PNG, JPEG or WebP"

_ORIENTATION_TAG = ExifTags.Base.Orientation
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})

# Modes that carry more than 8 bits per sample; Pillow's own convert("L") clips them instead of scaling.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

# The header is bounded so that a string starting with "data:" but lacking a comma is not scanned end to end.
_DATA_URL = re.compile(r"\s*data:([^,]{0,256}),", re.IGNORECASE)
_BASE64_WHITESPACE = b" \t\r\n\v\f"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def decode_base64_image(text: str, *, param: str = "image") -> bytes:
    """Decode a base64 image field: plain base64 (standard or URL-safe, padding optional, whitespace ignored) or a
    `data:image/...;base64,` URL. Returns the raw file bytes; says nothing about whether they are an image."""
    if not isinstance(text, str):
        raise InvalidRequest(param, f"{param} must be a base64-encoded image string")

    start = 0
    match = _DATA_URL.match(text)
    if match is not None:
        _check_data_url_header(match.group(1), param)
        start = match.end()
    else:
        head = text[:64].lstrip().lower()
        if head.startswith("data:"):
            raise InvalidRequest(param, f"{param} is a malformed data URL; expected data:image/<type>;base64,<data>")
        if head.startswith(("http://", "https://")):
            raise InvalidRequest(param, f"{param} must be the image itself (base64 or a file upload), not a URL")

    try:
        blob = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidRequest(param, f"{param} is not valid base64") from None
    if start:
        blob = blob[start:]
    # One pass that both drops line breaks/spaces (MIME-style wrapped base64) and maps the URL-safe alphabet onto the
    # standard one; bytes.translate avoids the per-line string objects that split()/join() would create.
    blob = blob.translate(_URLSAFE_TO_STANDARD, _BASE64_WHITESPACE)

    # Padding is looked at in place (at most two '=' are legal) so that correctly padded input, the common case, is
    # decoded without another copy, and a run of '=' costs nothing to examine.
    padded = 2 if blob.endswith(b"==") else 1 if blob.endswith(b"=") else 0
    end = len(blob) - padded
    if end == 0 and not padded:
        raise InvalidRequest(param, f"{param} is empty; send a PNG, JPEG or WebP image")
    if end == 0 or blob.endswith(b"=", 0, end) or end % 4 == 1:
        raise InvalidRequest(param, f"{param} is not valid base64 (bad length or padding)")
    padding = -end % 4
    if len(blob) != end + padding:
        blob = blob[:end] + b"=" * padding

    try:
        return base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(param, f"{param} is not valid base64") from None


def _check_data_url_header(header: str, param: str) -> None:
    declared_type, *parameters = (part.strip().lower() for part in header.split(";"))
    if "base64" not in parameters:
        raise InvalidRequest(param, f"{param} data URL must be base64-encoded (data:image/<type>;base64,...)")
    if not declared_type.startswith("image/"):
        shown = declared_type or "(none)"
        raise InvalidRequest(param, f"{param} data URL must have an image/* media type, got {shown[:64]}")


def decode_image(
    data: bytes,
    *,
    param: str = "image",
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """Decode an uploaded image into a fully loaded RGB image with its EXIF orientation applied.

    Sizes are checked from the header before any pixel is decoded, so an oversized or bomb-like file costs only the
    parse of its header. Every problem with the bytes becomes an `InvalidRequest` for `param`.
    """
    return _decode(data, param, min_side, max_side, _to_rgb)


def decode_mask(data: bytes, *, size: tuple[int, int], param: str = "mask") -> Image.Image:
    """Decode an edit mask: an image with an alpha channel whose fully transparent pixels mark the area to change
    (OpenAI's convention), the same size as the edited image (`size`, width x height, after EXIF orientation).

    Returns mode "L": 255 where the picture is to be regenerated, 0 where it must be kept. A mask of another size,
    without alpha, or with no fully transparent pixel is an `InvalidRequest` for `param`.
    """
    plane = _decode(data, param, MIN_SIDE, MAX_SIDE, _alpha_plane)
    if plane is None:
        raise InvalidRequest(
            param, f"{param} has no alpha channel; send a PNG whose fully transparent pixels mark the area to change"
        )
    if plane.size != size:
        raise InvalidRequest(
            param,
            f"{param} is {plane.size[1]}x{plane.size[0]} (HEIGHTxWIDTH), but the image is {size[1]}x{size[0]}; "
            "the mask must be the same size as the (first) image",
        )
    regenerate = plane.point(lambda alpha: 255 if alpha == 0 else 0)
    if regenerate.getbbox() is None:
        raise InvalidRequest(
            param, f"{param} has no fully transparent pixel, so nothing would change; make the area to edit transparent"
        )
    return regenerate


def _decode(data: bytes, param: str, min_side: int, max_side: int, finish):
    """Open, check and fully load an upload, apply its EXIF orientation and hand it to `finish`, which returns the
    in-memory result (possibly the image itself, which is then copied away from the file-backed object)."""
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got {min_side} and {max_side}")
    if not data:
        raise InvalidRequest(param, f"{param} is empty; send a PNG, JPEG or WebP image")

    # The bomb warning (more than MAX_IMAGE_PIXELS, less than twice that) is raised from Image.open itself, so it has
    # to be an error while opening. catch_warnings swaps process-wide filter state and is not thread-safe, but the
    # filter only concerns DecompressionBombWarning: if a concurrent decode lost it, the side check below would still
    # reject such an image (MAX_SIDE**2 is far below Pillow's threshold); if one leaked it, the warning would just be
    # an error elsewhere too, which is the safe direction.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data), formats=_ACCEPTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_many_pixels(param, min_side, max_side) from None
        except MemoryError:
            raise
        except Exception:
            # UnidentifiedImageError for unknown or excluded formats; plugins raise assorted other types for headers
            # they choke on. Either way the client sent something we cannot use.
            raise InvalidRequest(param, _UNSUPPORTED.format(param=param)) from None

        with opened as image:
            _check_sides(image, param, min_side, max_side)
            try:
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _too_many_pixels(param, min_side, max_side) from None
            except MemoryError:
                raise
            except Exception:
                # Truncated data, bad checksums, broken compressed streams: Pillow reports these as OSError,
                # SyntaxError, ValueError, EOFError, struct.error... depending on plugin and version.
                raise InvalidRequest(param, f"{param} could not be decoded; the file is truncated or corrupt") from None

            oriented = _apply_orientation(image)
            try:
                result = finish(oriented)
            except MemoryError:
                raise
            except Exception:
                message = f"{param} uses colour mode {oriented.mode}, which is not supported"
                raise InvalidRequest(param, message) from None

            if result is image:
                # Still the file-backed object (it may hold the input buffer and, for GIF/TIFF, a seekable frame
                # reader); the caller gets a plain in-memory image instead.
                result = image.copy()
    if result is not None:
        # EXIF/XMP orientation, ICC and similar metadata no longer describe these pixels; a later exif_transpose or
        # encoder must not act on them.
        result.info = {}
    return result


def _alpha_plane(image: Image.Image) -> Image.Image | None:
    """The alpha channel as mode "L" (0 = fully transparent), or None for an image without transparency."""
    if not image.has_transparency_data:
        return None
    if image.mode in ("RGBA", "LA"):
        return image.getchannel("A")
    return image.convert("RGBA").getchannel("A")


def _too_many_pixels(param: str, min_side: int, max_side: int) -> InvalidRequest:
    limit = Image.MAX_IMAGE_PIXELS
    amount = f"more than {limit} pixels" if limit else "too many pixels"
    return InvalidRequest(
        param, f"{param} is too large ({amount}); each side must be between {min_side} and {max_side} pixels"
    )


def _check_sides(image: Image.Image, param: str, min_side: int, max_side: int) -> None:
    width, height = image.size
    # The bounds apply to both sides alike, so the decision does not depend on orientation; orientation only decides
    # which size the message reports (the one the client sees in an image viewer).
    if min_side <= width <= max_side and min_side <= height <= max_side:
        return
    if _orientation(image, may_decode=False) in _SWAPS_SIDES:
        width, height = height, width
    raise InvalidRequest(
        param,
        f"{param} is {width} pixels wide and {height} pixels high; "
        f"each side must be between {min_side} and {max_side} pixels",
    )


def _orientation(image: Image.Image, *, may_decode: bool) -> int:
    # Pillow's PNG reader decodes the whole image to find an eXIf chunk placed after the pixel data; before the size
    # is known to be acceptable that is exactly what must not happen.
    if not may_decode and image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        # Malformed EXIF is common in camera and phone files; the pixels are still fine, only the hint is lost.
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    # Same transposes as ImageOps.exif_transpose, but tolerant of unreadable EXIF and without that function's full
    # copy of images that need no change (metadata cleanup is unnecessary: decode_image drops all metadata).
    method = _TRANSPOSE_FOR_ORIENTATION.get(_orientation(image, may_decode=True))
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_8bit(np.asarray(image))).convert("RGB")
    if image.has_transparency_data:
        # The model takes no alpha; white is what a transparent PNG looks like on a typical page or viewer, and
        # keeps cut-outs from turning black (the colour most encoders store under alpha 0).
        rgba = image.convert("RGBA")
        flattened = Image.new("RGB", rgba.size, (255, 255, 255))
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _to_8bit(samples: np.ndarray) -> np.ndarray:
    if samples.dtype.kind == "f":
        samples = np.nan_to_num(samples.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(samples.min()), float(samples.max())
        if low >= 0.0 and high <= 1.0:
            # Float images (TIFF) conventionally hold 0..1 intensities.
            return np.rint(samples * 255.0).astype(np.uint8)
        return _stretch(samples, low, high)
    low, high = int(samples.min()), int(samples.max())
    if low >= 0 and high <= 0xFFFF:
        # 16-bit samples: 0..65535 maps onto 0..255 (65535 / 257 == 255), rounding to nearest.
        return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return _stretch(samples.astype(np.float32), low, high)


def _stretch(samples: np.ndarray, low: float, high: float) -> np.ndarray:
    # Values outside any conventional range (signed or 32-bit integers, HDR floats): use the image's own range rather
    # than clipping most of it away.
    if high <= low:
        return np.zeros(samples.shape, dtype=np.uint8)
    return np.rint((samples - low) * (255.0 / (high - low))).astype(np.uint8)


def encode_image(image: Image.Image, fmt: str = "png", quality: int | None = None) -> bytes:
    """Encode `image` as png, jpeg or webp. `quality` (0..100) is for jpeg/webp and defaults to DEFAULT_QUALITY.

    Raises ValueError for an unknown format, a quality out of range, or a quality with png: these are request fields
    the HTTP layer validates (output_format, output_compression), so reaching here with a bad one is a server bug.
    """
    key = _format_key(fmt)
    if quality is not None:
        if key == "png":
            raise ValueError("quality applies to jpeg and webp, not png")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
            raise ValueError(f"quality must be an integer between 0 and 100, got {quality!r}")
    level = DEFAULT_QUALITY if quality is None else quality

    buffer = io.BytesIO()
    if key == "png":
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        image.save(buffer, format="PNG", **PNG_SAVE_OPTIONS)
    elif key == "jpeg":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=level)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        image.save(buffer, format="WEBP", quality=level, method=WEBP_METHOD)
    return buffer.getvalue()


def media_type(fmt: str) -> str:
    return _MEDIA_TYPES[_format_key(fmt)]


def file_extension(fmt: str) -> str:
    return _EXTENSIONS[_format_key(fmt)]


def media_type_of_file(name: str) -> str:
    """The media type of a file named with one of file_extension's extensions (a stored result)."""
    extension = name.rsplit(".", 1)[-1]
    formats = [fmt for fmt, known in _EXTENSIONS.items() if known == extension]
    if not formats:
        raise ValueError(f"not a result file name: {name!r}")
    return _MEDIA_TYPES[formats[0]]


def _format_key(fmt: str) -> str:
    key = fmt.lower() if isinstance(fmt, str) else None
    if key not in _PILLOW_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    return key
