"""HTTP(S) fetching that cannot be turned against the cluster (SSRF) and cannot hang.

Every hop, the first URL and each redirect target, is checked before it is requested: the scheme must be http or
https, and every address the host name resolves to must be public (not private, loopback, link-local, the cloud
metadata address, multicast, reserved or unspecified), unless the host is listed in ``allow_hosts`` or
``allow_private_networks`` is set. The connection is then made to the checked address itself (the name is not
resolved a second time, so a DNS answer that changes between check and connect cannot slip through). A whole
object, all redirects and retries included, must arrive within ``deadline`` seconds.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from easyref.data.fetch_config import FetchConfig, check_size
from easyref.data.reasons import Reason, Rejection

if TYPE_CHECKING:
    import urllib3

RETRY_STATUSES = (429, 500, 502, 503, 504)
REDIRECTS = (301, 302, 303, 307, 308)
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def checked_addresses(url: str, config: FetchConfig) -> tuple[str, ...]:
    """The addresses to connect to for ``url``, in resolver order (``()``: the host is allowed by name, resolve it
    as usual).

    Raises :class:`Rejection` (``blocked_address``) for a URL ingest may not fetch.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Rejection(Reason.BLOCKED_ADDRESS, f"{url}: only http(s) URLs with a host are fetched")
    host = parts.hostname.lower()
    if host in {h.lower() for h in config.allow_hosts}:
        return ()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise Rejection(Reason.FETCH_FAILED, f"{url}: cannot resolve {host}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not config.allow_private_networks:
        for address in addresses:
            plain = getattr(address, "ipv4_mapped", None) or address
            if not plain.is_global or plain in METADATA_ADDRESSES or plain.is_multicast:
                raise Rejection(
                    Reason.BLOCKED_ADDRESS,
                    f"{url}: {host} resolves to {address}, a private, loopback, link-local or metadata address; "
                    f"list the host in ingest.fetch.allow_hosts or set ingest.fetch.allow_private_networks",
                )
    return tuple(dict.fromkeys(str(address) for address in addresses))


def http_get(url: str, config: FetchConfig) -> bytes:
    """The body of ``url`` (at most ``max_bytes``), every hop checked, all within ``deadline`` seconds."""
    from urllib3.exceptions import HTTPError

    deadline = time.monotonic() + config.deadline
    attempts = hops = 0
    while True:
        addresses = checked_addresses(url, config)
        try:
            status, detail, data = _request_any(url, addresses, config, deadline)
        except HTTPError as exc:
            status, detail, data = None, f"HTTP request failed: {exc}", b""
        if status in REDIRECTS and detail:
            hops += 1
            if hops > config.max_redirects:
                raise Rejection(Reason.FETCH_FAILED, f"more than {config.max_redirects} redirects")
            url = urljoin(url, detail)
            continue
        if status == 200:
            return data
        retryable = status is None or status in RETRY_STATUSES
        wait = config.backoff * 2**attempts
        if not retryable or attempts >= config.retries or time.monotonic() + wait >= deadline:
            message = detail if status is None else f"HTTP {status} {detail}"
            raise Rejection(Reason.FETCH_FAILED, f"{message} (after {attempts} retries)")
        attempts += 1
        time.sleep(wait)


def _request_any(url: str, addresses: tuple[str, ...], config: FetchConfig, deadline: float) -> tuple[int, str, bytes]:
    """:func:`_request` to each checked address in turn until one accepts the connection."""
    from urllib3.exceptions import NewConnectionError

    candidates: tuple[str | None, ...] = addresses or (None,)
    for i, address in enumerate(candidates):
        try:
            return _request(url, address, config, deadline)
        except NewConnectionError:
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def _request(url: str, address: str | None, config: FetchConfig, deadline: float) -> tuple[int, str, bytes]:
    """One GET to ``address`` (the checked address of the URL's host), no redirect followed.

    Returns (status, the Location header for a redirect or the reason phrase, the body of a 200 response).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Rejection(Reason.FETCH_FAILED, f"not fetched within the deadline of {config.deadline} s")
    parts = urlsplit(url)
    pool = _pool(parts.scheme, parts.hostname or "", address, parts.port, config.concurrency)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    response = pool.urlopen(
        "GET",
        target,
        headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "easyref-ingest"},
        redirect=False,
        retries=False,
        preload_content=False,
        timeout=min(config.timeout, remaining),
    )
    try:
        if response.status != 200:
            detail = response.headers.get("location") if response.status in REDIRECTS else response.reason
            return response.status, detail or "", b""
        data = bytearray()
        while chunk := response.read1(1 << 16):
            data += chunk
            if len(data) > config.max_bytes:
                break
            if time.monotonic() > deadline:
                raise Rejection(Reason.FETCH_FAILED, f"not fetched within the deadline of {config.deadline} s")
        return 200, "", check_size(bytes(data), config.max_bytes)
    finally:
        response.release_conn()


@functools.lru_cache(maxsize=64)
def _pool(scheme: str, host: str, address: str | None, port: int | None, size: int) -> urllib3.HTTPConnectionPool:
    """A connection pool to ``address`` (or ``host``) that speaks TLS for ``host`` (SNI, certificate check), keeping
    up to ``size`` connections (one per request in flight) open for reuse."""
    import urllib3

    if scheme == "http":
        return urllib3.HTTPConnectionPool(address or host, port or 80, maxsize=size)
    import certifi

    return urllib3.HTTPSConnectionPool(
        address or host,
        port or 443,
        maxsize=size,
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
        server_hostname=host,
        assert_hostname=host,
    )
