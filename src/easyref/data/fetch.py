"""Fetching an image's bytes from a local file, S3 (boto3) or HTTP(S), with timeouts and bounded retries.

Local files must be regular files (a FIFO, device or socket is refused without being opened for a blocking read).
HTTP(S) goes through :mod:`easyref.data.fetch_http`, which refuses private and metadata addresses (SSRF) and
enforces a per-object deadline. Failures raise :class:`~easyref.data.reasons.Rejection`; clients are created once
per worker process.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from easyref.data.reasons import Reason, Rejection
from easyref.data.sources import Location


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """How remote images are fetched."""

    s3_endpoint: str | None = None
    """S3 API endpoint (MinIO, moto, ...); ``None`` uses boto3's default (which honours ``AWS_ENDPOINT_URL``)."""
    timeout: float = 10.0
    """Seconds to wait for a connection and between bytes received."""
    retries: int = 3
    """Retries after the first attempt for connection errors and HTTP 429/5xx."""
    backoff: float = 0.5
    """Exponential backoff factor in seconds between retries."""
    max_bytes: int = 64 * 2**20
    """Larger files are rejected as ``too_large`` without being read whole."""
    deadline: float = 60.0
    """Seconds for a whole remote object, all redirects and retries included."""
    max_redirects: int = 5
    """HTTP redirects followed per object; each target is checked like the first URL."""
    allow_hosts: tuple[str, ...] = ()
    """Host names fetched even when they resolve to private or loopback addresses (an in-cluster MinIO, ...)."""
    allow_private_networks: bool = False
    """Fetch from private, loopback and link-local addresses (never the cloud metadata address otherwise)."""

    def __post_init__(self) -> None:
        for name in ("timeout", "deadline"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError(
                f"retries and max_redirects must not be negative, got {self.retries}, {self.max_redirects}"
            )
        if self.backoff < 0 or not math.isfinite(self.backoff):
            raise ValueError(f"backoff must be a non-negative number of seconds, got {self.backoff!r}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))


def fetch(location: Location, config: FetchConfig) -> bytes:
    """The bytes at ``location``."""
    if location.scheme == "file":
        return _read_file(location.target, config.max_bytes, location.identity)
    if location.scheme == "s3":
        return _read_s3(location.target, config)
    from easyref.data.fetch_http import http_get

    return http_get(location.target, config)


def _read_file(path: str, max_bytes: int, identity: tuple[int, int] | None = None) -> bytes:
    """A regular file's bytes; opened non-blocking, so that a FIFO or device cannot hang the read. With
    ``identity`` (``(st_dev, st_ino)`` when the path was listed and checked), another file found at the path now (a
    symlink swapped in) is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise Rejection(Reason.MISSING_FILE, f"no such file: {path}") from None
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}") from None
    with open(fd, "rb", closefd=True) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Rejection(Reason.UNREADABLE, f"{path} is not a regular file (a FIFO, device or socket)")
        if identity is not None and (info.st_dev, info.st_ino) != tuple(identity):
            raise Rejection(
                Reason.PATH_ESCAPE, f"{path} is not the file that was listed and checked (replaced since); re-run"
            )
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise Rejection(Reason.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}") from None
    return check_size(data, max_bytes)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://BUCKET/KEY``; the key is taken verbatim (``#`` and ``?`` are part of it)."""
    rest = uri[len("s3://") :] if uri.lower().startswith("s3://") else ""
    bucket, _, key = rest.partition("/")
    return bucket, key


def _read_s3(uri: str, config: FetchConfig) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    if not bucket or not key:
        raise Rejection(Reason.FETCH_FAILED, f"{uri}: expected s3://BUCKET/KEY")
    client = _s3_client(config.s3_endpoint, config.timeout, config.retries)
    deadline = time.monotonic() + config.deadline
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] > config.max_bytes:
            raise Rejection(Reason.TOO_LARGE, f"{response['ContentLength']} bytes, more than {config.max_bytes}")
        data = bytearray()
        for chunk in response["Body"].iter_chunks(1 << 16):
            data += chunk
            if len(data) > config.max_bytes:
                break
            if time.monotonic() > deadline:
                raise Rejection(Reason.FETCH_FAILED, f"not fetched within the deadline of {config.deadline} s")
        return check_size(bytes(data), config.max_bytes)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise Rejection(
            Reason.FETCH_FAILED, f"S3 error {error.get('Code', '?')}: {error.get('Message', exc)}"
        ) from None
    except BotoCoreError as exc:
        raise Rejection(Reason.FETCH_FAILED, f"S3 request failed: {exc}") from None


def check_size(data: bytes, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise Rejection(Reason.TOO_LARGE, f"more than {max_bytes} bytes")
    return data


@functools.cache
def _s3_client(endpoint: str | None, timeout: float, retries: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": retries + 1, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
