"""Checking and normalising one image: size limits from the header, full decode, EXIF orientation, RGB, resize.

Decompression bombs are never decoded: the pixel count is read from the header and checked first.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from easyref.data.reasons import Reason, Rejection

if TYPE_CHECKING:
    from PIL import Image

SUFFIXES = {"jpeg": ".jpg", "png": ".png"}


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """Limits and the stored form of normalised images."""

    min_side: int = 64
    """Images whose shorter side is smaller are rejected as ``too_small``."""
    max_side: int = 1024
    """The longer side is scaled down to this (Lanczos); smaller images keep their size."""
    max_pixels: int = 40_000_000
    """Images with more pixels (from the header) are rejected as ``too_large`` without being decoded."""
    format: Literal["jpeg", "png"] = "jpeg"
    """How normalised images are stored."""
    quality: int = 95
    """JPEG quality (4:4:4 chroma, no subsampling)."""


@dataclass(frozen=True, kw_only=True)
class NormalizedImage:
    image_id: str
    """SHA-256 (first 32 hex digits) of ``data``: the content address."""
    data: bytes
    width: int
    height: int
    phash: str
    """64-bit perceptual hash (DCT) of the normalised image, 16 hex digits."""


def normalize(data: bytes, config: ImageConfig) -> NormalizedImage:
    """Check ``data`` and return the normalised image; raises :class:`Rejection` for a bad image."""
    image = _decode(data, config)
    buffer = io.BytesIO()
    if config.format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=config.quality, subsampling=0)
    encoded = buffer.getvalue()
    return NormalizedImage(
        image_id=hashlib.sha256(encoded).hexdigest()[:32],
        data=encoded,
        width=image.width,
        height=image.height,
        phash=perceptual_hash(image),
    )


def perceptual_hash(image: Image.Image) -> str:
    """The DCT perceptual hash (pHash, as in ``imagehash.phash``): 64 bits as 16 hex digits.

    The image is reduced to 32x32 grey levels; each bit says whether one of the 8x8 lowest-frequency DCT-II
    coefficients is above their median. Computed with numpy (two small matrix products), without scipy.
    """
    import numpy as np
    from PIL import Image

    n, k = 32, 8
    pixels = np.asarray(image.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    basis = np.cos(np.pi * np.arange(k)[:, None] * (2 * np.arange(n)[None, :] + 1) / (2 * n))
    low = basis @ pixels @ basis.T  # low[u, v]: vertical frequency u, horizontal frequency v
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _decode(data: bytes, config: ImageConfig) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Rejection(Reason.UNREADABLE, "the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with our own limit
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejection(Reason.TOO_LARGE, f"not decoded: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise Rejection(Reason.UNREADABLE, f"not an image: {exc}") from None
    width, height = image.size
    if width * height > config.max_pixels:
        raise Rejection(Reason.TOO_LARGE, f"{width}x{height} pixels, more than {config.max_pixels}; not decoded")
    if min(width, height) < config.min_side:
        raise Rejection(Reason.TOO_SMALL, f"{width}x{height} pixels, the shorter side is under {config.min_side}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise Rejection(Reason.UNREADABLE, f"{image.format} image cannot be decoded: {exc}") from None
    image = _to_rgb(image)
    if max(image.size) > config.max_side:
        scale = config.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels are composited over white rather than turning black."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
