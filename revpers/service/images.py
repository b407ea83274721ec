"""Image decoding and encoding at the service boundary.

Input: JPEG/PNG/WebP (anything Pillow reads) as bytes or a path. EXIF orientation is applied,
grayscale, palette, RGBA/LA (composited on white) and 16-bit images are converted to 8-bit RGB.
Output: PNG/JPEG/WebP bytes with no EXIF, GPS, ICC or embedded thumbnail.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from revpers.core.errors import InputError, ParameterError
from revpers_client.protocol import MAX_PIXELS as PROTOCOL_MAX_PIXELS

MAX_PIXELS = PROTOCOL_MAX_PIXELS  # default limit, ~8000 x 8000; larger inputs are refused before decoding
# Pillow refuses, on its own, images above twice its MAX_IMAGE_PIXELS (a decompression-bomb guard, read
# from the header like ours); a configured limit above that could not be honoured.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
MIN_SIDE = 16


class ImageError(InputError):
    """The input is not an image this service can process (message says why)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def too_many_pixels(name: str, pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> ImageError:
    """The one message for an image over the pixel limit, whoever noticed it (us or Pillow)."""
    dims = f"{size[0]}x{size[1]} = " if size else ""
    count = f"{dims}{pixels} pixels" if pixels is not None else "too many pixels"
    return ImageError(f"{name}: image is {count}; the limit is {limit} pixels")


def decode_image(data: bytes | bytearray | memoryview, name: str = "input", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array, EXIF orientation applied. Images of more
    than ``max_pixels`` pixels are refused from their header, before any pixel is decoded."""
    data = bytes(data)
    if not data:
        raise ImageError(f"{name}: empty input (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w < MIN_SIDE or h < MIN_SIDE:
                raise ImageError(f"{name}: image is {w}x{h}; both sides must be at least {MIN_SIDE} px")
            if w * h > max_pixels:
                raise too_many_pixels(name, w * h, max_pixels, (w, h))
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.ascontiguousarray(np.asarray(_to_rgb(img), dtype=np.uint8))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (expected JPEG, PNG or WebP)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own header check, above its limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_many_pixels(name, int(found.group(1)) if found else None, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image: {exc}") from None


def read_file(path: str | Path) -> bytes:
    """A file's bytes; a file that cannot be read is an ImageError naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file: {exc.strerror or exc}") from None


def read_image_bytes(path: str | Path) -> tuple[bytes, np.ndarray]:
    """The file's bytes (e.g. to hash them for the audit) and the decoded (H, W, 3) uint8 RGB."""
    data = read_file(path)
    return data, decode_image(data, name=str(path))


def read_image(path: str | Path) -> np.ndarray:
    return read_image_bytes(path)[1]


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def encode_image(rgb: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    """Encode (H, W, 3) uint8 RGB with no metadata at all (no EXIF/GPS/ICC/thumbnail)."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ParameterError(f"unsupported output format {fmt!r}; use PNG, JPEG or WEBP")
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def format_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ParameterError(f"{path}: output extension must be one of {', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]
