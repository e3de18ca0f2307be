"""easyref ingest on real files: every rejection reason, normalisation, S3 and HTTP sources, determinism, cache."""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import moto_s3, noise_image, png_bomb, save
from PIL import Image

from easyref.cli import main
from easyref.data.demo import write_demo_data
from easyref.data.fetch import FetchConfig
from easyref.data.images import ImageConfig
from easyref.data.ingest import IngestConfig, ingest
from easyref.errors import UserError

FAST = IngestConfig(workers=1, fetch=FetchConfig(timeout=5, retries=1, backoff=0))


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "rejected.parquet")


def reasons(rejected: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejected["uri"], rejected["reason"], strict=True))


def test_every_rejection_reason_with_real_files(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    outside = save(noise_image(99), tmp_path / "outside.png")
    save(noise_image(1), root / "g1/good.png")
    save(noise_image(2), root / "g1/other.jpg", quality=95)
    jpeg = io.BytesIO()
    noise_image(3, (128, 128)).save(jpeg, format="JPEG")
    (root / "g1/truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "g1/empty.png").write_bytes(b"")
    (root / "g1/text.png").write_text("this is not an image\n")
    save(noise_image(4, (16, 16)), root / "g1/tiny.png")
    png_bomb(root / "g1/bomb.png", 100_000, 100_000)  # beyond Pillow's own limit
    png_bomb(root / "g1/large.png", 9_000, 9_000)  # under Pillow's limit, over max_pixels
    save(noise_image(1), root / "g1/z-copy.png")
    save(noise_image(2).resize((90, 90)).resize((96, 96)), root / "g1/z-near.png")
    save(noise_image(5), root / "g1/no-caption.png")
    save(noise_image(6), root / "g1/blank-caption.png")
    (root / "g1/link.png").symlink_to(outside)
    (root / "g2").symlink_to(tmp_path, target_is_directory=True)
    save(noise_image(7), root / "loose.png")
    captions = {p.relative_to(root).as_posix(): f"caption of {p.name}" for p in root.rglob("*.*")}
    del captions["g1/no-caption.png"]
    captions["g1/blank-caption.png"] = "   "
    captions.pop("g1/other.jpg")
    (root / "g1/other.txt").write_text("a caption from a sidecar\n")
    (root / "captions.jsonl").write_text(
        "".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in captions.items())
    )

    table_dir = tmp_path / "tables"
    save(noise_image(8), table_dir / "ok.png")
    absolute = save(noise_image(9), tmp_path / "elsewhere/abs.png")
    file_uri = save(noise_image(10), tmp_path / "elsewhere/uri.png")
    pd.DataFrame(
        {
            "image": [
                "ok.png",
                "../outside.png",
                "missing.png",
                str(absolute),
                file_uri.as_uri(),
                "ok.png",
                "ftp://x/y.png",
            ],
            "caption": ["fine", "escapes", "gone", "absolute", "file uri", "no group", "ftp"],
            "group": ["t", "t", "t", "t", "t", "", "t"],
            "licence": ["cc-by", "cc0", None, "cc0", "cc0", "cc0", "cc0"],
        }
    ).to_csv(table_dir / "table.csv", index=False)

    out = tmp_path / "out"
    # absolute and file:// paths outside the table's folder need an allowed root (tests/test_ingest_local_files.py)
    result = ingest([str(root), str(table_dir / "table.csv")], out, replace(FAST, allow_roots=(str(absolute.parent),)))
    manifest, rejected = read(out)

    by_uri = reasons(rejected)
    assert by_uri["g1/truncated.jpg"] == "unreadable"
    assert by_uri["g1/empty.png"] == "unreadable"
    assert by_uri["g1/text.png"] == "unreadable"
    assert by_uri["g1/tiny.png"] == "too_small"
    assert by_uri["g1/bomb.png"] == "too_large"
    assert by_uri["g1/large.png"] == "too_large"  # a decode attempt would have said "unreadable": no pixel data
    assert by_uri["g1/z-copy.png"] == "duplicate"
    assert by_uri["g1/z-near.png"] == "near_duplicate"
    assert by_uri["g1/no-caption.png"] == "bad_caption"
    assert by_uri["g1/blank-caption.png"] == "bad_caption"
    assert by_uri["g1/link.png"] == "path_escape"
    assert by_uri["g2"] == "path_escape"
    assert by_uri["loose.png"] == "bad_group"
    assert by_uri["../outside.png"] == "path_escape"
    assert by_uri["missing.png"] == "missing_file"
    assert by_uri["ftp://x/y.png"] == "fetch_failed"
    assert rejected.loc[rejected["uri"] == "ok.png", "reason"].tolist() == ["bad_group"]
    assert all(rejected["message"].str.len() > 0)

    assert sorted(manifest["uri"]) == sorted(
        ["g1/good.png", "g1/other.jpg", "ok.png", str(absolute), file_uri.as_uri()]
    )
    assert manifest.set_index("uri").loc["g1/other.jpg", "caption"] == "a caption from a sidecar"
    assert json.loads(manifest.set_index("uri").loc["ok.png", "metadata"]) == {"licence": "cc-by"}
    for row in manifest.itertuples():
        stored = out / row.path
        assert stored.is_file() and row.image_id in stored.name
    # nothing lost: every input row is in exactly one table (15 folder rows, the symlinked folder g2 being one, 7 table rows)
    assert len(manifest) + len(rejected) == 15 + 7 == result.accepted + result.rejected
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accepted"] == len(manifest) and stats["rejected_by_reason"]["path_escape"] == 3
    assert Image.open(out / "group_sizes.png").size == (720, 400)


def test_normalisation_exif_alpha_and_max_side(tmp_path: Path) -> None:
    root = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save(noise_image(1, (160, 96)), root / "g/rotated.jpg", exif=exif, quality=95)
    save(noise_image(2, (96, 96), "RGBA"), root / "g/alpha.png")
    save(noise_image(3, (400, 200)), root / "g/big.png")
    for p in root.glob("g/*"):
        p.with_suffix(".txt").write_text(p.stem)
    out = tmp_path / "out"
    ingest([str(root)], out, replace(FAST, image=ImageConfig(max_side=200, format="png")))
    manifest = read(out)[0].set_index("uri")
    assert tuple(manifest.loc["g/rotated.jpg", ["width", "height"]]) == (96, 160)
    assert tuple(manifest.loc["g/big.png", ["width", "height"]]) == (200, 100)
    for path in manifest["path"]:
        assert path.endswith(".png") and Image.open(out / path).mode == "RGB"


def test_rerun_is_byte_identical_parallel_or_not_and_only_new_rows_are_processed(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    write_demo_data(demo, size=64, min_images=3, max_images=4)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    first = ingest([str(demo)], serial, FAST, progress=False)
    assert first.rejected == 0 and first.processed == first.accepted
    ingest([str(demo)], parallel, replace(FAST, workers=2), progress=False)
    again = ingest([str(demo)], serial, FAST, progress=False)
    assert again.processed == 0 and again.cached == first.accepted
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    for rel in files:
        assert (serial / rel).read_bytes() == (parallel / rel).read_bytes(), rel

    extra = tmp_path / "extra"
    for i in range(3):
        save(noise_image(100 + i), extra / "new-group" / f"{i}.png")
        (extra / "new-group" / f"{i}.txt").write_text(f"new image {i}")
    grown = ingest([str(demo), str(extra)], serial, FAST, progress=False)
    assert (grown.processed, grown.cached, grown.accepted) == (3, first.accepted, first.accepted + 3)

    shrunk = ingest([str(extra)], serial, FAST, progress=False)  # a dropped source leaves no stored images behind
    assert shrunk.processed == 0 and len(list((serial / "images").glob("*/*"))) == 3


def test_every_row_rejected_exits_non_zero_with_a_clear_message(tmp_path: Path, capsys) -> None:
    (tmp_path / "src/g").mkdir(parents=True)
    (tmp_path / "src/g/a.png").write_text("not an image")
    (tmp_path / "src/g/a.txt").write_text("a caption")
    code = main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "all 1 input rows were rejected (unreadable: 1)" in err and "rejected.parquet" in err
    assert len(pd.read_parquet(tmp_path / "out/rejected.parquet")) == 1


def test_table_without_required_columns_is_a_user_error(tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.png"], "text": ["x"]}).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match="missing column.*caption, group"):
        ingest([str(tmp_path / "t.jsonl")], tmp_path / "out", FAST)


def test_s3_source_against_a_moto_server(tmp_path: Path, monkeypatch) -> None:
    with moto_s3(monkeypatch, "images", {f"g/{i}.png": noise_image(i) for i in range(2)}) as endpoint:
        table = tmp_path / "s3.jsonl"
        uris = ["s3://images/g/0.png", "s3://images/g/1.png", "s3://images/g/missing.png", "s3://nobucket/x.png"]
        pd.DataFrame({"image": uris, "caption": "c", "group": "g"}).to_json(table, orient="records", lines=True)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the flag-less way: boto3 reads it
        code = main(["ingest", str(table), "--out", str(tmp_path / "out"), "--workers", "1", "--retries", "0"])
    assert code == 0
    manifest, rejected = read(tmp_path / "out")
    assert sorted(manifest["uri"]) == uris[:2]
    assert reasons(rejected) == {uris[2]: "fetch_failed", uris[3]: "fetch_failed"}
    assert "NoSuchKey" in rejected.set_index("uri").loc[uris[2], "message"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/flaky.png`` fails with 503 on its first request."""

    flaky_calls = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/flaky.png":
            type(self).flaky_calls += 1
            if type(self).flaky_calls == 1:
                self.send_error(503)
                return
            self.path = "/0.png"
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


def test_http_source_with_retries_and_failures(tmp_path: Path) -> None:
    served = tmp_path / "served"
    for i in range(2):
        save(noise_image(i), served / f"{i}.png")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: _Handler(*a, directory=str(served), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        uris = [f"{base}/1.png", f"{base}/flaky.png", f"{base}/missing.png", "http://127.0.0.1:9/refused.png"]
        table = tmp_path / "web.parquet"
        pd.DataFrame({"image": uris, "caption": "c", "group": ["a", "b", "a", "a"]}).to_parquet(table)
        local = replace(FAST, fetch=replace(FAST.fetch, allow_private_networks=True))  # the server is on loopback
        ingest([str(table)], tmp_path / "out", local)
    finally:
        server.shutdown()
        thread.join()
    manifest, rejected = read(tmp_path / "out")
    assert sorted(manifest["uri"]) == uris[:2]  # the flaky URL succeeded on its retry
    assert _Handler.flaky_calls == 2
    assert reasons(rejected) == {uris[2]: "fetch_failed", uris[3]: "fetch_failed"}
    assert "HTTP 404" in rejected.set_index("uri").loc[uris[2], "message"]
    # fetch failures are not cached: they are tried again on the next run
    cache = pd.read_parquet(tmp_path / "out/.cache/ingest.parquet")
    assert not cache["reason"].eq("fetch_failed").any() and len(cache) == 2


def test_cli_help_and_demo_layout(tmp_path: Path) -> None:
    assert main(["demo-data", "--out", str(tmp_path / "raw"), "--size", "64"]) == 0
    for i in range(3):
        assert Image.open(tmp_path / f"raw/red-star/{i:03d}.png").size == (64, 64)
    lines = (tmp_path / "raw/captions.jsonl").read_text().splitlines()
    groups = {json.loads(line)["image"].split("/")[0] for line in lines}
    assert len(groups) >= 40 and "red-star" in groups
    assert os.path.getsize(tmp_path / "raw/red-star/000.png") > 0


def test_demo_data_omit_colour_changes_the_captions_only(tmp_path: Path, capsys) -> None:
    """`--omit-colour 1`: no caption names its subject's colour, and the images are those of the default; the
    default leaves the colour out of some captions only; a share outside [0, 1] is refused."""
    from easyref.data.demo import COLOURS

    def captions(folder: Path) -> dict[str, str]:
        lines = (folder / "captions.jsonl").read_text().splitlines()
        return {row["image"]: row["caption"] for row in map(json.loads, lines)}

    args = ["--size", "32", "--min-images", "3", "--max-images", "3"]
    assert main(["demo-data", "--out", str(tmp_path / "default"), *args]) == 0
    assert main(["demo-data", "--out", str(tmp_path / "none"), *args, "--omit-colour", "1"]) == 0
    default, none = captions(tmp_path / "default"), captions(tmp_path / "none")
    assert default.keys() == none.keys()

    def named(caption: str, image: str) -> bool:
        colour = next(c for c in COLOURS if c in image.split("/")[0].split("-"))
        return f" {colour} " in caption.replace("pale blue", "").replace("pale green", "")

    assert not any(named(c, image) for image, c in none.items())
    assert 0.4 < sum(named(c, image) for image, c in default.items()) / len(default) < 0.8  # 60% name it
    for image in list(default)[:20]:
        assert (tmp_path / "default" / image).read_bytes() == (tmp_path / "none" / image).read_bytes()
    assert main(["demo-data", "--out", str(tmp_path / "bad"), *args, "--omit-colour", "1.5"]) != 0
    assert "--omit-colour 1.5: a share of captions, between 0 and 1" in capsys.readouterr().err


def test_demo_data_patterns_all_gives_every_colour_shape_and_pattern(tmp_path: Path, capsys) -> None:
    """`--patterns all`: one group per colour x shape x pattern (192), each folder's images in its own pattern; the
    default keeps the 48-subject catalogue (one pattern per colour x shape), whose subjects are among them."""
    from easyref.data.demo import COLOURS, PATTERNS, SHAPES, catalogue

    one, every = catalogue(), catalogue("all")
    assert len(one) == 48 and len({(s.colour, s.shape) for s in one}) == 48
    assert len(every) == len(COLOURS) * len(SHAPES) * len(PATTERNS) == len({s.slug for s in every})
    assert set(one) < set(every)
    with pytest.raises(ValueError, match="patterns must be one of one, all"):
        catalogue("some")
    args = ["--size", "32", "--min-images", "3", "--max-images", "3"]
    assert main(["demo-data", "--out", str(tmp_path / "all"), *args, "--patterns", "all"]) == 0
    assert "wrote 576 images in 192 groups" in capsys.readouterr().out
    folders = {p.name for p in (tmp_path / "all").iterdir() if p.is_dir()}
    assert folders == {s.slug for s in every}
    # the same colour and shape in two patterns: different images
    plain, striped = (tmp_path / "all/red-star/000.png"), (tmp_path / "all/striped-red-star/000.png")
    assert plain.read_bytes() != striped.read_bytes()
    with pytest.raises(SystemExit):
        main(["demo-data", "--out", str(tmp_path / "bad"), *args, "--patterns", "some"])
    assert "invalid choice: 'some'" in capsys.readouterr().err


def test_perceptual_hash_matches_imagehash() -> None:
    import imagehash

    from easyref.data.images import perceptual_hash

    for seed in range(20):
        image = noise_image(seed, (120, 90))
        assert perceptual_hash(image) == str(imagehash.phash(image))
