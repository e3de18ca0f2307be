"""Fetching an image's bytes from a local file, S3 (boto3) or HTTP(S) (requests), with timeouts and bounded retries.

Failures raise :class:`~easyref.data.reasons.Rejection`; clients are created once per worker process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from easyref.data.reasons import Reason, Rejection
from easyref.data.sources import Location

if TYPE_CHECKING:
    import requests

RETRY_STATUSES = (429, 500, 502, 503, 504)


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


def fetch(location: Location, config: FetchConfig) -> bytes:
    """The bytes at ``location``."""
    if location.scheme == "file":
        return _read_file(location.target, config.max_bytes)
    if location.scheme == "s3":
        return _read_s3(location.target, config)
    return _read_http(location.target, config)


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise Rejection(Reason.MISSING_FILE, f"no such file: {path}") from None
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}") from None
    return _check_size(data, max_bytes)


def _read_s3(uri: str, config: FetchConfig) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise Rejection(Reason.FETCH_FAILED, f"{uri}: expected s3://BUCKET/KEY")
    client = _s3_client(config.s3_endpoint, config.timeout, config.retries)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] > config.max_bytes:
            raise Rejection(Reason.TOO_LARGE, f"{response['ContentLength']} bytes, more than {config.max_bytes}")
        return _check_size(response["Body"].read(config.max_bytes + 1), config.max_bytes)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise Rejection(
            Reason.FETCH_FAILED, f"S3 error {error.get('Code', '?')}: {error.get('Message', exc)}"
        ) from None
    except BotoCoreError as exc:
        raise Rejection(Reason.FETCH_FAILED, f"S3 request failed: {exc}") from None


def _read_http(url: str, config: FetchConfig) -> bytes:
    import requests

    session = _http_session(config.retries, config.backoff)
    try:
        with session.get(url, timeout=config.timeout, stream=True) as response:
            if response.status_code != 200:
                raise Rejection(Reason.FETCH_FAILED, f"HTTP {response.status_code} {response.reason}")
            data = bytearray()
            for chunk in response.iter_content(chunk_size=1 << 16):
                data += chunk
                if len(data) > config.max_bytes:
                    break
            return _check_size(bytes(data), config.max_bytes)
    except requests.RequestException as exc:
        raise Rejection(
            Reason.FETCH_FAILED, f"HTTP request failed (with up to {config.retries} retries): {exc}"
        ) from None


def _check_size(data: bytes, max_bytes: int) -> bytes:
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


@functools.cache
def _http_session(retries: int, backoff: float) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
