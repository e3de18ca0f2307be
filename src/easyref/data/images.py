"""Checking and normalising one image: size limits from the header, full decode, EXIF orientation, RGB, resize.

Decompression bombs are never decoded: the pixel count is read from the header and checked first.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from easyref.data.reasons import Reason, Rejection

if TYPE_CHECKING:
    from PIL import Image

SUFFIXES = {"jpeg": ".jpg", "png": ".png"}
_ADDRESS = re.compile(r" <[^<>]* at 0x[0-9a-fA-F]+>")


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

    def __post_init__(self) -> None:
        for name in ("min_side", "max_side", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) must be at least min_side ({self.min_side})")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


@dataclass(frozen=True, kw_only=True)
class NormalizedImage:
    image_id: str
    """SHA-256 (first 32 hex digits) of ``data``: the content address."""
    data: bytes
    width: int
    height: int
    phash: str
    """64-bit perceptual hash (DCT) of the normalised image, 16 hex digits."""
    colour: str
    """The image's colour signature (:func:`colour_signature`)."""


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
        colour=colour_signature(image),
    )


def perceptual_hash(image: Image.Image) -> str:
    """The DCT perceptual hash of ``imagehash.phash``: 64 bits as 16 hex digits. It sees grey levels only."""
    import imagehash

    return str(imagehash.phash(image))


COLOUR_GRID = 4


def colour_signature(image: Image.Image) -> str:
    """The mean colour of each cell of a 4x4 grid (48 bytes as hex): what pHash, being colour-blind, misses."""
    from PIL import Image

    return image.convert("RGB").resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).tobytes().hex()


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
            # Pillow names the buffer by its memory address: left out, so that re-runs write the same message
            raise Rejection(Reason.UNREADABLE, f"not an image: {_ADDRESS.sub('', str(exc))}") from None
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
        if min(size) < config.min_side:
            raise Rejection(
                Reason.TOO_SMALL,
                f"{width}x{height} pixels: scaled to max_side {config.max_side}, the shorter side would be "
                f"{min(size)}, under min_side {config.min_side} (aspect ratio {max(size) / min(size):.0f}:1)",
            )
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
