"""Ingest cannot be turned against the host or the cluster (issue 10 items 5 and 6).

HTTP: every hop is checked after DNS resolution, private/loopback/link-local/metadata addresses are refused unless
allowed in params, and a whole object must arrive within a deadline. Local files: table paths stay inside the
table's folder or an --allow-root, and FIFOs, devices and sockets are refused without being opened.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import noise_image, save

from easyref.cli import main
from easyref.data.fetch import FetchConfig
from easyref.data.fetch_http import checked_addresses
from easyref.data.ingest import IngestConfig, ingest
from easyref.data.reasons import Rejection

FAST = IngestConfig(workers=1, fetch=FetchConfig(timeout=5, retries=0, backoff=0))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """/hop redirects to /secret on 127.0.0.1; /drip sends a byte every 0.2 s; everything served is recorded."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append(self.path)
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/secret")
            self.end_headers()
            return
        if self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(50):  # at most 10 s, whatever the client does
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path):
    served = tmp_path / "served"
    save(noise_image(1), served / "secret", format="PNG")
    save(noise_image(2), served / "ok.png")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Handler(*a, directory=str(served), **k))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.seen = []
    yield httpd.server_address[1]
    httpd.shutdown()
    thread.join()


def web_table(path: Path, uris: list[str]) -> Path:
    pd.DataFrame({"image": uris, "caption": "c", "group": "g"}).to_csv(path, index=False)
    return path


def rejected_reasons(out: Path) -> dict[str, tuple[str, str]]:
    rejected = pd.read_parquet(out / "rejected.parquet")
    return {r.uri: (r.reason, r.message) for r in rejected.itertuples()}


def test_loopback_urls_are_refused_by_default_without_a_request(tmp_path: Path, server: int, capsys) -> None:
    table = web_table(tmp_path / "t.csv", [f"http://127.0.0.1:{server}/secret", f"http://localhost:{server}/ok.png"])
    assert main(["ingest", str(table), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 2
    reasons = rejected_reasons(tmp_path / "out")
    assert {reason for reason, _ in reasons.values()} == {"blocked_address"}
    assert "allow_private_networks" in next(iter(reasons.values()))[1]
    assert _Handler.seen == []  # nothing reached the server


def test_a_redirect_to_a_private_address_is_refused_at_the_hop(tmp_path: Path, server: int) -> None:
    uris = [f"http://localhost:{server}/hop", f"http://localhost:{server}/ok.png"]
    allowed = replace(FAST, fetch=replace(FAST.fetch, allow_hosts=("localhost",)))  # the first host only
    ingest([str(web_table(tmp_path / "t.csv", uris))], tmp_path / "out", allowed)
    reason, message = rejected_reasons(tmp_path / "out")[uris[0]]
    assert reason == "blocked_address" and "127.0.0.1" in message
    assert "/secret" not in _Handler.seen and _Handler.seen.count("/hop") == 1
    assert pd.read_parquet(tmp_path / "out/manifest.parquet")["uri"].tolist() == [uris[1]]


def test_a_slow_drip_stops_at_the_per_object_deadline(tmp_path: Path, server: int) -> None:
    fetch = replace(FAST.fetch, allow_private_networks=True, timeout=5, deadline=1.5)
    uris = [f"http://127.0.0.1:{server}/drip", f"http://127.0.0.1:{server}/ok.png"]
    start = time.monotonic()
    ingest([str(web_table(tmp_path / "t.csv", uris))], tmp_path / "out", replace(FAST, fetch=fetch))
    assert time.monotonic() - start < 6  # the drip alone would take 10 s, each byte well within the read timeout
    reason, message = rejected_reasons(tmp_path / "out")[uris[0]]
    assert reason == "fetch_failed" and "deadline of 1.5 s" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/x.png",
        "http://172.16.0.1/x.png",
        "http://192.168.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/",
        "http://[::1]/x.png",
        "http://[fe80::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://0.0.0.0/x.png",
        "http://127.1/x.png",
        "ftp://example.org/x.png",
    ],
)
def test_private_link_local_and_metadata_addresses_are_refused_before_any_connection(url: str) -> None:
    with pytest.raises(Rejection) as caught:
        checked_addresses(url, FetchConfig())
    assert caught.value.reason == "blocked_address"


def test_public_addresses_pass_and_allowed_names_skip_the_check() -> None:
    assert checked_addresses("http://93.184.215.14/x.png", FetchConfig()) == ("93.184.215.14",)
    assert checked_addresses("http://localhost:1/x", FetchConfig(allow_hosts=("LOCALHOST",))) == ()
    assert checked_addresses("http://127.0.0.1:1/x", FetchConfig(allow_private_networks=True)) == ("127.0.0.1",)


def test_table_paths_outside_the_table_folder_need_an_allowed_root(tmp_path: Path, capsys) -> None:
    secret = save(noise_image(3), tmp_path / "private/secret.png")
    uris = [str(secret), secret.as_uri(), "ok.png"]
    save(noise_image(4), tmp_path / "tables/ok.png")
    table = web_table(tmp_path / "tables/t.csv", uris)
    args = ["ingest", str(table), "--workers", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    reasons = rejected_reasons(tmp_path / "out")
    assert {reasons[u][0] for u in uris[:2]} == {"path_escape"} and "--allow-root" in reasons[uris[0]][1]
    assert main([*args, "--out", str(tmp_path / "allowed"), "--allow-root", str(tmp_path / "private")]) == 0
    assert len(pd.read_parquet(tmp_path / "allowed/manifest.parquet")) == 2  # the same image twice: one kept


def test_fifos_devices_and_sockets_are_rejected_without_hanging(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    save(noise_image(5), root / "g/ok.png")
    os.mkfifo(root / "g/fifo.png")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(root / "g/sock.png"))
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"image": f"g/{n}", "caption": "c"}) + "\n" for n in ("ok.png", "fifo.png", "sock.png"))
    )
    os.mkfifo(tmp_path / "table-fifo.png")
    table = web_table(tmp_path / "t.csv", ["table-fifo.png", "/dev/zero"])
    command = [sys.executable, "-m", "easyref.cli", "ingest", str(root), str(table), "--out", str(tmp_path / "out")]
    command += ["--allow-root", "/dev", "--workers", "1", "--no-progress"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)  # a FIFO read would block forever
    finally:
        unix.close()
    assert run.returncode == 0, run.stderr
    reasons = rejected_reasons(tmp_path / "out")
    for uri in ("g/fifo.png", "g/sock.png", "table-fifo.png", "/dev/zero"):
        assert reasons[uri][0] == "unreadable" and "not a regular file" in reasons[uri][1], uri
