"""Fetching an image's bytes from a local file, S3 (boto3) or HTTP(S), with timeouts and bounded retries.

Local files must be regular files (a FIFO, device or socket is refused without being opened for a blocking read).
HTTP(S) goes through :mod:`easyref.data.fetch_http`, which refuses private and metadata addresses (SSRF) and
enforces a per-object deadline. Failures raise :class:`~easyref.data.reasons.Rejection`; clients are created once
per worker process.
"""

from __future__ import annotations

import functools
import os
import stat
import threading
import time
from typing import Any

from easyref.data.fetch_config import FetchConfig, check_size
from easyref.data.fetch_http import http_get
from easyref.data.reasons import Reason, Rejection
from easyref.data.sources import Location

__all__ = ["FetchConfig", "check_size", "fetch", "split_s3_uri"]


def fetch(location: Location, config: FetchConfig) -> bytes:
    """The bytes at ``location``."""
    if location.scheme == "file":
        return _read_file(location.target, config.max_bytes, location.identity)
    if location.scheme == "s3":
        return _read_s3(location.target, config)
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
    client = _s3_client(config.s3_endpoint, config.timeout, config.retries, config.concurrency)
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


_S3_CLIENT_LOCK = threading.Lock()


def _s3_client(endpoint: str | None, timeout: float, retries: int, pool: int) -> Any:
    """One client per process and settings, shared by the fetching threads (boto3 clients are thread-safe; their
    creation is not, hence the lock)."""
    with _S3_CLIENT_LOCK:
        return _new_s3_client(endpoint, timeout, retries, pool)


@functools.cache
def _new_s3_client(endpoint: str | None, timeout: float, retries: int, pool: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": retries + 1, "mode": "standard"},
        max_pool_connections=pool,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
