"""Trust at the edges of ingest and split (issue 19): ingest never deletes what it did not write, every caption file
is confined and bounded as images are, a file swapped after listing is refused, and split refuses a count that its
pins would silently ignore."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import noise_image, save
from test_data_split import read_split, write_manifest
from test_ingest_bad_input import captioned, read, run_ingest

from easyref.cli import main
from easyref.data.ingest import IngestConfig
from easyref.data.ingest_work import process_image
from easyref.data.sources import read_folder, read_source
from easyref.errors import UserError


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_that_holds_or_lies_inside_a_source_is_refused_and_nothing_is_deleted(tmp_path: Path, capsys) -> None:
    mydata = tmp_path / "mydata"
    for i in range(6):
        captioned(mydata / "images", f"g{i % 2}/{i}.png", noise_image(i))
    before = files_under(mydata)
    for out in (mydata, mydata / "images", mydata / "images" / "g0" / "out"):
        assert run_ingest(str(mydata / "images"), "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}" in err and "outside every source" in err, err
        assert files_under(mydata) == before  # nothing deleted, nothing written (not even a lock file)
    table = mydata / "t.csv"
    pd.DataFrame({"image": ["images/g0/0.png"], "caption": ["c"], "group": ["g"]}).to_csv(table, index=False)
    assert run_ingest(str(table), "--out", str(mydata)) == 2
    assert "holds the source" in capsys.readouterr().err


def test_orphan_removal_deletes_only_files_ingest_wrote(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(4):
        captioned(raw, f"g/{i}.png", noise_image(10 + i))
    assert run_ingest(str(raw), "--out", str(out)) == 0
    stored = sorted((out / "images").glob("*/*.jpg"))
    # the user's own files in OUT/images (names ingest never gives) and ingest's own stale files
    mine = [save(noise_image(20), out / "images" / name, format="PNG") for name in ("g/photo.png", "ab/notes.png")]
    own_orphan = out / "images" / "ff" / ("ff" + "0" * 30 + ".jpg")
    own_orphan.parent.mkdir(exist_ok=True)
    shutil.copy(stored[0], own_orphan)
    temp = stored[0].with_name(f".{stored[0].name}.123-0a1b2c3d.tmp")
    temp.write_bytes(b"half")
    misnamed = out / "images" / "00" / ("ff" + "0" * 30 + ".jpg")  # an id under another prefix: not ingest's name
    misnamed.parent.mkdir(exist_ok=True)
    misnamed.write_bytes(b"x")
    assert run_ingest(str(raw), "--out", str(out)) == 0
    assert all(p.is_file() for p in [*mine, misnamed, *stored])
    assert not own_orphan.exists() and not temp.exists()


def test_a_stored_image_a_table_row_reads_is_not_deleted(tmp_path: Path) -> None:
    """A table whose row reads an image in OUT/images, ingested into that OUT: the image it reads stays."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    captioned(raw, "g/a.png", noise_image(30))
    assert run_ingest(str(raw), "--out", str(out)) == 0
    stored = next((out / "images").glob("*/*.jpg"))
    table = tmp_path / "tables" / "t.csv"
    table.parent.mkdir()
    pd.DataFrame({"image": [str(stored)], "caption": ["c"], "group": ["g"]}).to_csv(table, index=False)
    assert run_ingest(str(table), "--out", str(out), "--allow-root", str(out), "--format", "png") == 0
    assert read(out)[0]["path"].tolist() != [stored.relative_to(out).as_posix()]  # stored anew: the old is stale
    assert stored.is_file()


def test_caption_sidecars_and_captions_jsonl_are_confined_like_images(tmp_path: Path, capsys) -> None:
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the secret token 0xSECRET")
    raw = tmp_path / "raw"
    captioned(raw, "g/ok.png", noise_image(40))
    save(noise_image(41), raw / "g/leak.png", format="PNG")
    (raw / "g/leak.txt").symlink_to(secret)
    assert run_ingest(str(raw), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, _ = read(tmp_path / "out")
    assert "0xSECRET" not in manifest.to_json() + rejected.to_json()
    row = rejected.set_index("uri").loc["g/leak.png"]
    assert row["reason"] == "path_escape" and "g/leak.txt" in row["message"] and "--allow-root" in row["message"]
    allowed = tmp_path / "allowed"
    assert run_ingest(str(raw), "--out", str(allowed), "--allow-root", str(secret.parent)) == 0
    assert "the secret token 0xSECRET" in set(read(allowed)[0]["caption"])

    jsonl = secret.with_name("captions.jsonl")
    jsonl.write_text(json.dumps({"image": "g/ok.png", "caption": "0xSECRET"}) + "\n")
    (raw / "captions.jsonl").symlink_to(jsonl)
    capsys.readouterr()
    assert run_ingest(str(raw), "--out", str(tmp_path / "out2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "captions.jsonl leads out of the source's folder" in err and "--allow-root" in err
    assert run_ingest(str(raw), "--out", str(tmp_path / "out3"), "--allow-root", str(secret.parent)) == 0


def test_an_image_swapped_for_a_symlink_after_listing_is_refused(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    captioned(raw, "g/a.png", noise_image(50))
    outside = save(noise_image(51), tmp_path / "private" / "secret.png", format="PNG")
    (row,) = read_source(str(raw), max_caption_chars=100)
    assert row.location is not None and row.problem is None
    (raw / "g/a.png").unlink()
    (raw / "g/a.png").symlink_to(outside)  # the listed, checked path now leads out
    outcome = process_image(row.location, out, IngestConfig())
    assert outcome.reason == "path_escape" and "not the file that was listed" in outcome.message
    assert not list(out.glob("images/*/*"))


def test_a_huge_caption_sidecar_is_read_only_as_far_as_the_caption_limit(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    save(noise_image(60), raw / "g/a.png", format="PNG")
    with open(raw / "g/a.txt", "wb") as f:
        f.truncate(256 * 2**20)  # sparse: 256 MiB of NUL bytes that take no disk
    tracemalloc.start()
    try:
        (row,) = read_folder(str(raw), max_caption_chars=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    assert row.problem is not None and row.problem.reason == "bad_caption"
    assert "ingest.max_caption_chars" in row.problem.message

    (raw / "g/a.txt").unlink()
    (raw / "captions.jsonl").write_text(json.dumps({"image": "g/a.png", "caption": "x" * 2**20}) + "\n")
    with pytest.raises(UserError, match=r"captions.jsonl:1: a line of more than \d+ bytes"):
        read_folder(str(raw), max_caption_chars=100)


def first_split(tmp_path: Path) -> list[str]:
    write_manifest(tmp_path / "m.parquet", 60)
    args = ["split", "--manifest", str(tmp_path / "m.parquet")]
    assert main([*args, "--out", str(tmp_path / "old"), "--held-out-groups", "4", "--held-in-groups", "5"]) == 0
    return args


@pytest.mark.parametrize("flag", ["--held-out-groups", "--held-in-groups"])
def test_split_refuses_a_group_count_its_pins_would_ignore(tmp_path: Path, capsys, flag: str) -> None:
    args = first_split(tmp_path)
    previous = ["--previous", str(tmp_path / "old/split.json")]
    assert main([*args, "--out", str(tmp_path / "new"), *previous, flag, "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} 10 contradicts" in err and "drop one of them" in err
    assert not (tmp_path / "new/split.json").exists()
    assert main([*args, "--out", str(tmp_path / "old"), flag, "10"]) == 2  # the split already in --out pins too
    assert "--fresh" in capsys.readouterr().err
    # the counts the split was made with are accepted, and carried on into the new split.json
    same = ["--held-out-groups", "4", "--held-in-groups", "5"]
    assert main([*args, "--out", str(tmp_path / "new"), *previous, *same]) == 0
    info = read_split(tmp_path / "new")[3]
    assert (info["held_out_groups"], info["held_in_groups"], info["groups"]["held_out"]) == (4, 5, 4)
