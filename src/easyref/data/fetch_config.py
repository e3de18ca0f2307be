"""How remote images are fetched (``ingest.fetch`` in params.yaml) and the size cap every reader applies.

A leaf module: :mod:`easyref.data.fetch` and :mod:`easyref.data.fetch_http` both import it, and it imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from easyref.data.reasons import Reason, Rejection


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
    concurrency: int = 32
    """Requests in flight per worker process (threads that wait on the network; decoding stays one at a time per
    worker). Also the size of each host's connection pool."""

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
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be a positive number of requests, got {self.concurrency!r}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))


def check_size(data: bytes, max_bytes: int) -> bytes:
    """``data``, or a ``too_large`` rejection when it holds more than ``max_bytes``."""
    if len(data) > max_bytes:
        raise Rejection(Reason.TOO_LARGE, f"more than {max_bytes} bytes")
    return data
