"""Why an input row was rejected: the reason codes of ``rejected.parquet``."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A rejection reason code; each row of ``rejected.parquet`` has one, plus a human message."""

    MISSING_FILE = "missing_file"
    """The image file (or the table's ``image`` value) does not exist."""
    UNREADABLE = "unreadable"
    """Not an image, an empty file, a truncated or corrupt image."""
    TOO_SMALL = "too_small"
    """The shorter side is under ``min_side`` pixels."""
    TOO_LARGE = "too_large"
    """More than ``max_pixels`` pixels (checked from the header, never decoded) or more than ``max_bytes`` bytes."""
    BAD_CAPTION = "bad_caption"
    """No caption, an empty one, one that is not text, or one longer than ``max_caption_chars``."""
    BAD_GROUP = "bad_group"
    """No group: an empty ``group`` value, or a file directly in a folder source's root."""
    DUPLICATE = "duplicate"
    """The same normalised image was already accepted from another row."""
    NEAR_DUPLICATE = "near_duplicate"
    """Within ``near_duplicate_distance`` bits of perceptual hash of an accepted image of the same group."""
    PATH_ESCAPE = "path_escape"
    """A symlink or ``../`` path that leads out of the folder the source lives in."""
    BLOCKED_ADDRESS = "blocked_address"
    """An http(s) URL (or a redirect) to a private, loopback, link-local or metadata address (SSRF guard)."""
    BAD_NAME = "bad_name"
    """A file or folder name that is not UTF-8 (the message shows its bytes escaped)."""
    FETCH_FAILED = "fetch_failed"
    """A remote image (``s3://``, ``http(s)://``) could not be fetched after the retries, or an unknown scheme."""


class Rejection(Exception):
    """Raised while reading or checking one row; the row goes to ``rejected.parquet``, the run goes on."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
