"""Where packed shards live: a local folder or an S3 prefix (``s3://bucket/prefix``).

A store reads whole objects (the marker, the index), byte ranges of objects (one sample's bytes in a shard: one
``pread`` locally, one ranged ``GET`` on S3) and writes finished local files into place (a rename locally, an upload
on S3). S3 endpoints: ``--s3-endpoint`` where a command offers it, else boto3's default, which honours
``AWS_ENDPOINT_URL`` (MinIO, moto, ...). Clients and file descriptors are opened lazily in the process that uses them,
so a dataset holding a store can be forked into DataLoader workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from easyref.errors import UserError

S3_TIMEOUT_S = 60.0
S3_RETRIES = 5


class Store(Protocol):
    location: str

    def url(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...
    def read(self, name: str) -> bytes: ...
    def read_range(self, name: str, offset: int, size: int) -> bytes: ...
    def put_file(self, local: Path, name: str) -> None: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


def is_s3(location: str) -> bool:
    return str(location).startswith("s3://")


def open_store(location: str | Path, endpoint: str | None = None) -> Store:
    """The store of a local folder or an ``s3://bucket/prefix`` URL."""
    location = str(location)
    if is_s3(location):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        if not bucket:
            raise UserError(f"{location}: expected s3://bucket/prefix")
        return S3Store(bucket, prefix.strip("/"), endpoint)
    return LocalStore(Path(location))


class LocalStore:
    """A folder; reads use one cached file descriptor per shard and process."""

    def __init__(self, root: Path):
        self.root, self.location = root, str(root)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def url(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise UserError(f"{self.url(name)}: cannot read it ({exc}); re-run easyref pack") from exc

    def _fd(self, name: str) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            try:
                self._fds[name] = os.open(self.root / name, os.O_RDONLY)
            except OSError as exc:
                raise UserError(f"{self.url(name)}: cannot open it ({exc}); re-run easyref pack") from exc
        return self._fds[name]

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        return os.pread(self._fd(name), size, offset)

    def put_file(self, local: Path, name: str) -> None:
        os.replace(local, self.root / name)

    def put_bytes(self, name: str, data: bytes) -> None:
        from easyref.data.parquet import _tmp_name

        path = self.root / name
        tmp = _tmp_name(path)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}


class S3Store:
    """Objects ``prefix/<name>`` in ``bucket``; one boto3 client per process."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None):
        self.bucket, self.prefix, self.endpoint = bucket, prefix, endpoint
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client: Any = None
        self._pid = os.getpid()

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=S3_TIMEOUT_S,
                read_timeout=S3_TIMEOUT_S,
                retries={"max_attempts": S3_RETRIES + 1, "mode": "standard"},
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
            self._pid = os.getpid()
        return self._client

    def _call(self, name: str, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self.key(name), **kw)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise UserError(
                f"{self.url(name)}: cannot {what} it (S3 {error.get('Code', '?')}: {error.get('Message', exc)})"
            ) from None
        except BotoCoreError as exc:
            raise UserError(f"{self.url(name)}: cannot {what} it ({exc})") from None

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def read(self, name: str) -> bytes:
        return self._call(name, "read", self.client.get_object)["Body"].read()

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        reply = self._call(name, "read", self.client.get_object, Range=f"bytes={offset}-{offset + size - 1}")
        return reply["Body"].read()

    def put_file(self, local: Path, name: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self.client.upload_file(str(local), self.bucket, self.key(name))
        except S3UploadFailedError as exc:
            raise UserError(f"{self.url(name)}: upload failed ({exc})") from None
        local.unlink()

    def put_bytes(self, name: str, data: bytes) -> None:
        self._call(name, "write", self.client.put_object, Body=data)

    def delete(self, name: str) -> None:
        self._call(name, "delete", self.client.delete_object)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}
