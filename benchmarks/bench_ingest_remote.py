"""Ingest of remote images at web latency: ``easyref ingest`` vs img2dataset on the same URL list, in one run.

    python benchmarks/bench_ingest_remote.py [--n 2000] [--delays 0 50 200] [--workers 2] [--concurrency 32]
        [--img2dataset-python PYTHON]

A local HTTP server (its own process, 127.0.0.1) serves N distinct 128 px JPEGs and waits ``delay`` ms before each
response, as a web server far away would. Both tools get the same URL table, the same processes (``--workers``)
and the same requests in flight per process (``--concurrency``; img2dataset's ``thread_count``), through their
command lines in child processes (start-up counts). EasyRef checks, normalises (re-encodes), hashes and
de-duplicates; img2dataset re-encodes into webdataset shards (``keep_ratio``, no upscaling: the same work per
image as EasyRef's ``max_side`` cap). The server also reports the most requests it saw in flight at once.

img2dataset is the ``bench`` extra (``pip install -e '.[bench]'``), or any interpreter that has it
(``--img2dataset-python``). Without it the script says so and times EasyRef alone.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_images(n: int, side: int = 128) -> list[bytes]:
    """``n`` distinct JPEGs (smooth random colour fields, so that no two are near duplicates)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def serve(folder: str, port_queue: multiprocessing.Queue, delay_file: str) -> None:
    """Serve ``folder/<i>.jpg`` after the delay (ms) written in ``delay_file``; ``/stats`` reports and resets the
    most requests in flight at once."""
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "served": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: both clients reuse connections

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/stats":
                with lock:
                    body = json.dumps(state).encode()
                    state.update(max=0, served=0)
                return self._reply(body, "application/json")
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            try:
                time.sleep(float(Path(delay_file).read_text()) / 1000)
                path = Path(folder) / Path(self.path).name
                if not path.is_file():
                    self.send_error(404)
                    return
                self._reply(path.read_bytes(), "image/jpeg")
            finally:
                with lock:
                    state["now"] -= 1
                    state["served"] += 1

        def _reply(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.request_queue_size = 1024
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def server_stats(port: int) -> dict[str, int]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.loads(response.read())


def time_easyref(table: Path, out: Path, workers: int, concurrency: int) -> float:
    params = out.parent / f"{out.name}-params.yaml"
    fetch = {"allow_private_networks": True, "concurrency": concurrency, "retries": 0, "timeout": 30}
    params.write_text(json.dumps({"ingest": {"workers": workers, "fetch": fetch}}))
    command = [sys.executable, "-m", "easyref.cli", "ingest", str(table), "--out", str(out), "--params", str(params)]
    t0 = time.perf_counter()
    subprocess.run([*command, "--no-progress"], check=True, stderr=subprocess.DEVNULL, env={**os.environ, **THREAD_ENV})
    return time.perf_counter() - t0


def time_img2dataset(python: str, table: Path, out: Path, n: int, workers: int, concurrency: int) -> float:
    options = {
        "url_list": str(table),
        "input_format": "parquet",
        "url_col": "image",
        "caption_col": "caption",
        "output_format": "webdataset",
        "output_folder": str(out),
        "processes_count": workers,
        "thread_count": concurrency,
        "number_sample_per_shard": math.ceil(n / (4 * workers)),  # every process gets shards
        "image_size": 1024,
        "resize_mode": "keep_ratio",
        "resize_only_if_bigger": True,
        "retries": 0,
        "timeout": 30,
        "enable_wandb": False,
        "distributor": "multiprocessing",
    }
    code = "import json, sys; from img2dataset import download; download(**json.loads(sys.argv[1]))"
    t0 = time.perf_counter()
    subprocess.run(
        [python, "-c", code, json.dumps(options)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **THREAD_ENV, "PYTHONPATH": ""},
    )
    return time.perf_counter() - t0


def img2dataset_ok(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import img2dataset"], capture_output=True, env={**os.environ, "PYTHONPATH": ""}
    )
    return probe.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="distinct images (default 2000)")
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 50, 200], help="ms per request (0 50 200)")
    parser.add_argument("--workers", type=int, default=2, help="processes of each tool (default 2)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per process (default 32)")
    parser.add_argument("--img2dataset-python", default=sys.executable, help="an interpreter with img2dataset")
    args = parser.parse_args()
    import pandas as pd

    other = args.img2dataset_python if img2dataset_ok(args.img2dataset_python) else None
    if other is None:
        print(
            f"img2dataset is not importable by {args.img2dataset_python}: install the bench extra "
            f"(pip install -e '.[bench]') or pass --img2dataset-python; timing EasyRef only",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "served").mkdir()
        for i, data in enumerate(make_images(args.n)):
            (tmp / "served" / f"{i}.jpg").write_bytes(data)
        delay_file = tmp / "delay_ms"
        delay_file.write_text("0")
        ports: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
        server = multiprocessing.get_context("spawn").Process(
            target=serve, args=(str(tmp / "served"), ports, str(delay_file)), daemon=True
        )
        server.start()
        port = ports.get(timeout=60)
        try:
            urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.n)]
            table = tmp / "urls.parquet"
            pd.DataFrame({"image": urls, "caption": [f"image {i}" for i in range(args.n)],
                          "group": [f"g{i // 4}" for i in range(args.n)]}).to_parquet(table)  # fmt: skip
            print(f"{args.n} images of 128 px, {args.workers} processes x {args.concurrency} requests in flight each")
            for delay in args.delays:
                delay_file.write_text(str(delay))
                server_stats(port)
                ours = time_easyref(table, tmp / f"easyref-{delay}", args.workers, args.concurrency)
                seen = server_stats(port)
                accepted = json.loads((tmp / f"easyref-{delay}" / "stats.json").read_text())["accepted"]
                line = (
                    f"delay {delay:5.0f} ms: easyref {ours:6.2f} s ({args.n / ours:6.1f} img/s, {accepted} accepted, "
                    f"max {seen['max']} in flight)"
                )
                if other:
                    theirs = time_img2dataset(
                        other, table, tmp / f"i2d-{delay}", args.n, args.workers, args.concurrency
                    )
                    seen = server_stats(port)
                    line += (
                        f"  img2dataset {theirs:6.2f} s ({args.n / theirs:6.1f} img/s, max {seen['max']} in flight)"
                        f"  easyref/img2dataset {ours / theirs:4.2f}"
                    )
                print(line, flush=True)
        finally:
            server.terminate()
            server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
