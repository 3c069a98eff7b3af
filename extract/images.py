"""Safe image loading: every image becomes an upright 8-bit RGB picture, or a clear reason why not.

Dermoscopy archives mix JPEGs from cameras (EXIF orientation), PNGs with alpha, 16-bit scans and the
odd broken file. Extraction must embed every good image the same way and list every bad one, so the
whole policy lives here, in one function.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageError",
    "decode_image",
    "failure_reason",
    "file_sha256",
    "load_image",
    "open_image",
    "read_image_file",
    "to_rgb8",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
"""Suffixes tried for bare image ids (in this order, so the common formats come first) and collected
from class folders, in any case. Pillow decodes all of them; TIFF scans are often 16-bit, which
`load_image` scales to 8 bits like any other image, and a multi-page TIFF gives its first page.
A WebP file that this Pillow cannot decode (built without libwebp) is listed as failed, saying so,
rather than skipped."""

ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited onto white (the usual background of cut-out lesion images)."""

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Images with more pixels than this are refused as decompression bombs (Pillow's own limit)."""


class ImageError(Exception):
    """An image that cannot be used; the message is the reason recorded under /failed."""


def failure_reason(exc: Exception) -> str:
    """The reason recorded for an image that raised `exc` while it was read: an ImageError's message, or
    the unexpected error named (one odd file must never stop a long run, but must say what happened)."""
    if isinstance(exc, ImageError):
        return str(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """Read `path` as upright 8-bit RGB; return it with the SHA-256 of the file's bytes.

    The file is read once: its bytes are hashed and decoded from memory.
    Raises ImageError with a short reason for a missing, empty, truncated, corrupt or oversized file.
    """
    data, sha256 = read_image_file(path)
    return decode_image(data, path, max_pixels), sha256


def read_image_file(path: str | Path) -> tuple[bytes, str]:
    """A file's bytes and their SHA-256; ImageError for a missing, unreadable or empty file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data, hashlib.sha256(data).hexdigest()


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A file's bytes opened by Pillow, header only (nothing decoded yet), after the decompression bomb
    guard; ImageError for bytes that are no image Pillow knows."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"refused: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} (decompression bomb guard)"
        )
    return img


def decode_image(data: bytes, path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A file's bytes decoded as upright 8-bit RGB (`path` names the file in a reason or warning)."""
    path = Path(path)
    try:
        img = open_image(data, max_pixels)
    except ImageError as exc:
        if str(exc).startswith("not an image") and path.suffix.lower() == ".webp" and not features.check("webp"):
            raise ImageError("cannot decode WebP: this Pillow was built without WebP support") from None
        raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"truncated or corrupt image: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a malformed EXIF block must not lose the image
        warnings.warn(f"{path}: EXIF orientation ignored ({exc})", stacklevel=2)
    return to_rgb8(img)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by scaling (never clipping) and alpha compositing."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb8(img)
    if img.mode == "La":  # premultiplied; Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # a colour key or palette alpha
        img = img.convert("RGBA")
    if img.mode in ("RGBa", "PA", "LA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, ALPHA_BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
    return img


def _high_depth_to_rgb8(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale to 8-bit RGB, scaled by the range of its type."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size == 0 or np.nanmax(arr) <= 1.0 else float(np.nanmax(arr))
        arr = np.nan_to_num(arr, nan=0.0) / top * 255.0
    else:
        top = 65535.0 if arr.size == 0 or arr.max() <= 65535 else float(arr.max())
        arr = arr / top * 255.0
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)  # clip only guards negatives and rounding
    return Image.fromarray(gray).convert("RGB")
