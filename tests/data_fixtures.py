"""Helpers for the data tests: real image files, broken ones, and small manifests."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (96, 96), mode: str = "RGB") -> Image.Image:
    """A random image: distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(size[1] // 8 + 1, size[0] // 8 + 1, len(mode)), dtype=np.uint8)
    big = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[: size[1], : size[0]]
    return Image.fromarray(big.squeeze() if mode == "L" else big, mode)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels and has no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@contextmanager
def moto_s3(monkeypatch: Any, bucket: str, objects: dict[str, Image.Image]) -> Iterator[str]:
    """A real moto S3 server on loopback holding ``objects`` (PNG) in ``bucket``; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]:
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=bucket)
        for key, image in objects.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            s3.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        yield endpoint
    finally:
        server.stop()
