"""A local stand-in for the Hugging Face Hub: serves folders as model repositories under the hub's URL scheme.

Endpoints (those ``huggingface_hub`` calls for ``snapshot_download`` / ``list_repo_files``):

* ``GET /api/models/{repo}/revision/{rev}``: repository info with the commit ``sha`` and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing (``oid`` = git blob sha1, and an
  ``lfs`` record with the sha256 for safetensors files, as the hub stores weights);
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (sha256 for LFS files,
  blob sha1 otherwise), ``Content-Length``, ``Accept-Ranges`` and ``Range`` support (206 + ``Content-Range``).

Faults for tests: ``drop_once`` (paths whose first GET sends half the body and closes the connection),
``fail_once`` (paths whose first GET answers 500), ``corrupt`` (paths whose GET sends zeros of the right length while
the listing and HEAD still advertise the true hashes) and ``extra_files`` (``{name: bytes}`` listed in every
repository, e.g. a hostile ``../x.json``). ``requests`` records ``(method, path, range header)``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def _blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Path] = {}
        self.drop_once: set[str] = set()
        self.fail_once: set[str] = set()
        self.corrupt: set[str] = set()
        self.extra_files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_repo(self, repo: str, revision: str, folder: Path) -> None:
        self.repos[(repo, revision)] = folder

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path_suffix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.endswith(path_suffix))

    # -- request handling -------------------------------------------------------------------------------------

    def _files(self, folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, data, head: bool = False) -> None:
        self._send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, head)

    def _not_found(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rev, sub = "/".join(parts[2:4]), parts[4], parts[5], "/".join(parts[6:])
            folder = self.repos.get((repo, rev))
            if folder is None:
                return self._not_found(h, head)
            files = [f for f in [*self._files(folder), *self.extra_files] if f.startswith(sub)]
            if kind == "revision":
                return self._json(h, {"id": repo, "sha": rev, "siblings": [{"rfilename": f} for f in files]}, head)
            return self._json(h, [self._entry(folder, f) for f in files], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            folder = self.repos.get((repo, rev))
            if folder is None or not (folder / name).is_file():
                return self._not_found(h, head)
            return self._file(h, folder, name, rev, head)
        return self._not_found(h, head)

    def _entry(self, folder: Path, name: str) -> dict:
        data = self.extra_files[name] if name in self.extra_files else (folder / name).read_bytes()
        entry = {"type": "file", "path": name, "size": len(data), "oid": _blob_sha1(data)}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, h: BaseHTTPRequestHandler, folder: Path, name: str, rev: str, head: bool) -> None:
        data = (folder / name).read_bytes()
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _blob_sha1(data)
        headers = {"X-Repo-Commit": rev, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if head:
            return self._send(h, 200, data, headers, head=True)
        with self.lock:
            fail = name in self.fail_once
            self.fail_once.discard(name)
            drop = name in self.drop_once
            self.drop_once.discard(name)
        if fail:
            return self._send(h, 500, b'{"error": "internal error"}', {}, head=False)
        start, status = 0, 200
        range_header = h.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[len("bytes=") :].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = bytes(len(data) - start) if name in self.corrupt else data[start:]
        if drop:  # announce the whole body, send half of it, hang up
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, status, body, headers, head=False)
