"""Ingest output is safe against a second writer and against a kill: one run per --out, and manifest.parquet,
rejected.parquet, stats.json and group_sizes.png are one unit that readers check (issue 10 items 1 and 3)."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import noise_image, save

from easyref.cli import main
from easyref.data.dataset import DatasetConfig, GroupDataset
from easyref.errors import UserError


def folder_source(root: Path, n_groups: int = 3, per_group: int = 3, seed: int = 0) -> Path:
    for g in range(n_groups):
        for i in range(per_group):
            image = save(noise_image(seed + 10 * g + i), root / f"g{g}/{i}.png")
            image.with_suffix(".txt").write_text(f"image {i} of group {g}")
    return root


def ingest_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "easyref.cli", "ingest", *args, "--workers", "1", "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_manifest_points_at_images(out: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) and all((out / path).is_file() for path in manifest["path"])
    return manifest


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; every request waits until the test sets ``release``."""

    arrived = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).arrived.set()
        type(self).release.wait(60)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def test_a_second_ingest_into_the_same_out_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    served = tmp_path / "served"
    for i in range(2):
        save(noise_image(100 + i), served / f"{i}.png")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _SlowHandler(*a, directory=str(served), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    table = tmp_path / "web.csv"
    pd.DataFrame({"image": [f"{base}/0.png", f"{base}/1.png"], "caption": "c", "group": "web"}).to_csv(table)
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  fetch:\n    allow_private_networks: true   # the test server is on loopback\n")
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "easyref.cli", "ingest", str(table), "--out", str(out), "--params", str(params)]
        + ["--workers", "1", "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _SlowHandler.arrived.wait(60), first.stderr.read() if first.poll() is not None else "no request"
        second = ingest_cli(str(folder_source(tmp_path / "raw")), "--out", str(out))  # the first holds the lock
        assert second.returncode == 2, second.stderr
        assert f"is being written by ingest (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        _SlowHandler.release.set()
        _, err = first.communicate(timeout=120)
        server.shutdown()
    assert first.returncode == 0, err
    assert set(assert_manifest_points_at_images(out)["group"]) == {"web"}
    # once the first is done, the second may write: its images replace the first's, and every row still resolves
    assert ingest_cli(str(tmp_path / "raw"), "--out", str(out)).returncode == 0
    assert set(assert_manifest_points_at_images(out)["group"]) == {"g0", "g1", "g2"}
    assert not list(out.glob("images/*/.*.tmp"))


KILL_AFTER_MANIFEST = textwrap.dedent(
    """
    import os, signal, sys
    import easyref.data.parquet as parquet
    write = parquet.write_parquet
    def write_then_die(table, path):
        write(table, path)
        if str(path).endswith(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # a kill (OOM, node drain) right after this file
    parquet.write_parquet = write_then_die
    from easyref.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def killed_run(*args: str, after: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", KILL_AFTER_MANIFEST, after, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_an_ingest_killed_after_the_manifest_is_refused_by_split_and_the_dataset(tmp_path: Path, capsys) -> None:
    raw, out = folder_source(tmp_path / "raw"), tmp_path / "out"
    assert ingest_cli(str(raw), "--out", str(out)).returncode == 0
    folder_source(tmp_path / "raw", n_groups=4, seed=50)  # the data changes; the next run is killed midway
    run = killed_run("ingest", str(raw), "--out", str(out), "--workers", "1", "--no-progress", after="manifest.parquet")
    assert run.returncode == -9
    # a new manifest beside the old rejected.parquet and stats.json: readers refuse the folder
    code = main(["split", "--manifest", str(out / "manifest.parquet"), "--out", str(tmp_path / "split")])
    assert code == 2 and "incomplete easyref ingest output" in capsys.readouterr().err
    with pytest.raises(UserError, match="incomplete easyref ingest output"):
        GroupDataset(out / "manifest.parquet", out, DatasetConfig())
    # a re-run completes the unit
    assert ingest_cli(str(raw), "--out", str(out)).returncode == 0
    assert (
        main(
            ["split", "--manifest", str(out / "manifest.parquet"), "--out", str(tmp_path / "split")]
            + ["--held-out-groups", "1", "--held-in-groups", "1"]
        )
        == 0
    )


def test_a_manifest_from_another_run_is_refused(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert ingest_cli(str(folder_source(tmp_path / "raw-a")), "--out", str(a)).returncode == 0
    assert ingest_cli(str(folder_source(tmp_path / "raw-b", seed=70)), "--out", str(b)).returncode == 0
    shutil.copy(b / "manifest.parquet", a / "manifest.parquet")  # mixed: b's manifest with a's rejects and stats
    code = main(["split", "--manifest", str(a / "manifest.parquet"), "--out", str(tmp_path / "split")])
    assert code == 2 and "outputs of different runs are mixed" in capsys.readouterr().err


def test_a_split_killed_midway_is_refused_by_the_training_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert ingest_cli(str(folder_source(tmp_path / "raw", n_groups=5)), "--out", str(out)).returncode == 0
    split = tmp_path / "split"
    args = ["split", "--manifest", str(out / "manifest.parquet"), "--out", str(split)]
    args += ["--held-out-groups", "1", "--held-in-groups", "1"]
    assert killed_run(*args, after="train.parquet").returncode == -9
    with pytest.raises(UserError, match="incomplete easyref split output"):
        GroupDataset(split / "train.parquet", out, DatasetConfig())
    assert main([*args, "--fresh"]) == 0
    assert len(GroupDataset(split / "train.parquet", out, DatasetConfig())) > 0
