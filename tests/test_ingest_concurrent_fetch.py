"""Remote rows are fetched with many requests in flight (``ingest.fetch.concurrency``), and the outputs are the
serial run's, byte for byte (issue 18 item 1).

A local server on 127.0.0.1 waits before each response and counts the requests it holds at once: overlap is proven
on the server side, not by timing.
"""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import noise_image, save

from easyref.cli import main
from easyref.data.fetch import FetchConfig
from easyref.data.ingest import IngestConfig, ingest

DELAY = 0.15
IMAGES = 12


class _Slow(http.server.SimpleHTTPRequestHandler):
    """Serves the folder after ``DELAY`` s; /busy answers 503 twice, then the image; records the most in flight."""

    lock = threading.Lock()
    now = most = 0
    busy = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        # A request is "in flight" while the server waits on it, and leaves before its answer is written: a client
        # that sends its next request only after an answer can then never be counted twice.
        cls = type(self)
        with cls.lock:
            cls.now += 1
            cls.most = max(cls.most, cls.now)
        try:
            time.sleep(DELAY)
        finally:
            with cls.lock:
                cls.now -= 1
        if self.path == "/busy.png":
            with cls.lock:
                cls.busy += 1
                fail = cls.busy % 3 != 0
            if fail:
                self.send_error(503)
                return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def slow_server(tmp_path: Path):
    served = tmp_path / "served"
    for i in range(IMAGES):
        save(noise_image(100 + i), served / f"{i}.png")
    save(noise_image(99), served / "busy.png")
    (served / "bad.png").write_text("not an image")  # Pillow's message names a memory address: must not leak
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Slow(*a, directory=str(served), **k))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    thread.join()


def _table(tmp_path: Path, port: int) -> Path:
    names = [f"{i}.png" for i in range(IMAGES)] + ["busy.png", "missing.png", "bad.png"]
    uris = [f"http://127.0.0.1:{port}/{name}" for name in names]
    uris.append(uris[0])  # the same URL twice: fetched once, the second row a duplicate
    table = tmp_path / "urls.csv"
    pd.DataFrame({"image": uris, "caption": "c", "group": [f"g{i % 3}" for i in range(len(uris))]}).to_csv(
        table, index=False
    )
    return table


def _config(workers: int, concurrency: int) -> IngestConfig:
    fetch = FetchConfig(allow_private_networks=True, retries=2, backoff=0.05, concurrency=concurrency)
    return IngestConfig(workers=workers, fetch=fetch)


def _run(table: Path, out: Path, config: IngestConfig) -> int:
    _Slow.now = _Slow.most = _Slow.busy = 0
    ingest([str(table)], out, config, progress=False)
    return _Slow.most


def _files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".lock" not in p.name
    }


def test_requests_overlap_and_outputs_equal_the_serial_run(tmp_path: Path, slow_server: int) -> None:
    table = _table(tmp_path, slow_server)
    serial = _run(table, tmp_path / "serial", _config(workers=1, concurrency=1))
    overlapped = _run(table, tmp_path / "threads", _config(workers=1, concurrency=8))
    spread = _run(table, tmp_path / "processes", _config(workers=2, concurrency=4))

    assert serial == 1
    assert overlapped >= 4  # 8 allowed; loosely, as a busy machine may start threads late
    assert spread >= 3  # 2 processes x 4 requests
    files = _files(tmp_path / "serial")
    assert _files(tmp_path / "threads") == files
    assert _files(tmp_path / "processes") == files
    rejected = pd.read_parquet(tmp_path / "serial" / "rejected.parquet").set_index("uri")["reason"]
    assert rejected[f"http://127.0.0.1:{slow_server}/missing.png"] == "fetch_failed"
    assert rejected[f"http://127.0.0.1:{slow_server}/bad.png"] == "unreadable"
    assert rejected[f"http://127.0.0.1:{slow_server}/0.png"] == "duplicate"  # the second row of the same URL
    manifest = pd.read_parquet(tmp_path / "serial" / "manifest.parquet")
    assert len(manifest) == IMAGES + 1  # busy.png after two 503s and two retries


def test_concurrency_must_be_positive(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        replace(FetchConfig(), concurrency=0)
    assert main(["ingest", str(tmp_path), "--out", str(tmp_path / "out"), "--concurrency", "0"]) == 2
    assert "concurrency must be a positive number" in capsys.readouterr().err
