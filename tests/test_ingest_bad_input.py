"""Bad input to ingest and split is a recorded rejected row or one clear error line (exit 2), never a traceback,
a silently wrong result or a lost run (issue 10 items 9 and 11, and the colour-blind near-duplicate filter)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from data_fixtures import moto_s3, noise_image, save
from PIL import Image

from easyref.cli import main
from easyref.data.parquet import write_parquet


def run_ingest(*args: str) -> int:
    return main(["ingest", *args, "--workers", "1", "--no-progress"])


def read(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    stats = json.loads((out / "stats.json").read_text())
    return pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "rejected.parquet"), stats


def captioned(root: Path, rel: str, image: Image.Image, caption: str = "a caption") -> Path:
    path = save(image, root / rel, format="PNG")
    path.with_suffix(".txt").write_text(caption)
    return path


def test_non_utf8_file_and_folder_names_are_rejected_rows_and_ingest_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    captioned(root, "g/ok.png", noise_image(1))
    buffer = io.BytesIO()
    noise_image(2).save(buffer, format="PNG")
    os.makedirs(os.fsencode(root / "g") + b"/caf\xe9", exist_ok=True)
    for name in (b"/g/bad\xff.png", b"/g/caf\xe9/x.png"):
        with open(os.fsencode(root) + name, "wb") as f:
            f.write(buffer.getvalue())
    assert run_ingest(str(root), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, _ = read(tmp_path / "out")
    assert manifest["uri"].tolist() == ["g/ok.png"]
    assert sorted(rejected["uri"]) == ["g/bad\\xff.png", "g/caf\\xe9/x.png"]
    assert set(rejected["reason"]) == {"bad_name"} and rejected["message"].str.contains("not UTF-8").all()


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-side", "0"],
        ["--min-side", "-1"],
        ["--max-side", "32", "--min-side", "64"],
        ["--timeout", "0"],
        ["--timeout", "-5"],
        ["--timeout", "nan"],
        ["--timeout", "inf"],
        ["--retries", "-1"],
        ["--max-pixels", "0"],
    ],
)
def test_bad_size_and_timeout_flags_exit_2_with_one_line(tmp_path: Path, capsys, flags: list[str]) -> None:
    captioned(tmp_path / "raw", "g/a.png", noise_image(1))
    assert run_ingest(str(tmp_path / "raw"), "--out", str(tmp_path / "out"), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("easyref ingest: error: ingest:") and "\n" not in err and flags[0][2:].replace("-", "_") in err
    )
    assert not (tmp_path / "out/manifest.parquet").exists()


def test_an_extreme_aspect_ratio_that_would_shrink_under_min_side_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    captioned(root, "g/strip.png", noise_image(1, (4000, 70)))  # 1024 x 18 after the max_side cap
    captioned(root, "g/fine.png", noise_image(2, (300, 100)))
    assert run_ingest(str(root), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, _ = read(tmp_path / "out")
    assert manifest["uri"].tolist() == ["g/fine.png"] and (manifest[["width", "height"]] >= 64).all(axis=None)
    row = rejected.set_index("uri").loc["g/strip.png"]
    assert row["reason"] == "too_small" and "aspect ratio" in row["message"]


def test_groups_that_are_lists_bools_or_mappings_are_rejected_rows(tmp_path: Path) -> None:
    save(noise_image(1), tmp_path / "t/a.png")
    records = [
        {"image": "a.png", "caption": "c", "group": [1, 2]},
        {"image": "a.png", "caption": "c", "group": True},
        {"image": "a.png", "caption": "c", "group": {"k": 1}},
        {"image": "a.png", "caption": "c", "group": 7},
    ]
    (tmp_path / "t/t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_ingest(str(tmp_path / "t/t.jsonl"), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, _ = read(tmp_path / "out")
    assert manifest["group"].tolist() == ["7"]
    assert rejected["reason"].tolist() == ["bad_group"] * 3
    assert rejected["message"].str.contains("list|bool|dict").all()


def test_control_characters_in_captions_are_stripped_and_recorded(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    captioned(root, "g/nul.png", noise_image(1), "a red\x00 star")
    captioned(root, "g/ansi.png", noise_image(2), "\x1b[31ma green\x1b[0m star\x1b]0;title\x07")
    captioned(root, "g/bidi.png", noise_image(3), "a \u202eblue\u202c star\u200f")
    captioned(root, "g/only.png", noise_image(4), "\x00\x1b[2J\u202e")
    captioned(root, "g/plain.png", noise_image(5), "a plain star")
    assert run_ingest(str(root), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, stats = read(tmp_path / "out")
    captions = dict(zip(manifest["uri"], manifest["caption"], strict=True))
    assert captions == {
        "g/nul.png": "a red star",
        "g/ansi.png": "a green star",
        "g/bidi.png": "a blue star",
        "g/plain.png": "a plain star",
    }
    assert rejected.set_index("uri").loc["g/only.png", "reason"] == "bad_caption"
    recorded = stats["control_characters_stripped"]["caption"]
    assert recorded["rows"] == 3 and sorted(recorded["examples"]) == ["g/ansi.png", "g/bidi.png", "g/nul.png"]


def test_s3_keys_with_hash_and_question_mark_fetch_the_named_object(tmp_path: Path, monkeypatch) -> None:
    # the prefixes before '#' and '?' are other objects, of other sizes: fetching them would be the old bug
    sizes = {"g/a#1.png": (96, 96), "g/a": (200, 100), "g/b?v=2.png": (120, 80), "g/b": (150, 100)}
    objects = {key: noise_image(i, size) for i, (key, size) in enumerate(sizes.items())}
    with moto_s3(monkeypatch, "images", objects) as endpoint:
        uris = ["s3://images/g/a#1.png", "s3://images/g/b?v=2.png"]
        table = tmp_path / "s3.csv"
        pd.DataFrame({"image": uris, "caption": "c", "group": "g"}).to_csv(table, index=False)
        assert run_ingest(str(table), "--out", str(tmp_path / "out"), "--s3-endpoint", endpoint) == 0
    manifest = read(tmp_path / "out")[0].set_index("uri")
    assert tuple(manifest.loc[uris[0], ["width", "height"]]) == (96, 96)
    assert tuple(manifest.loc[uris[1], ["width", "height"]]) == (120, 80)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"image_id": ["a", "b"], "group": ["g", None]}), "row 1: group is null"),
        (pd.DataFrame({"image_id": ["a", "b"], "group": [1, 2]}), "column 'group' holds int64"),
        (pd.DataFrame({"image_id": ["a", "b"], "group": [["x"], ["y"]]}), "column 'group' holds list"),
        (pd.DataFrame({"image_id": ["a", None], "group": ["g", "g"]}), "row 1: image_id is null"),
    ],
)
def test_split_refuses_null_or_non_text_groups(tmp_path: Path, capsys, frame: pd.DataFrame, message: str) -> None:
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "m.parquet")
    assert main(["split", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_split_of_a_file_that_is_not_parquet_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.parquet").write_text("image_id,group\na,g\n")
    assert main(["split", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "not a parquet manifest" in err and err.count("\n") == 1


def two_sources_sharing_a_group(tmp_path: Path) -> list[str]:
    for i, source in enumerate(("shop", "museum")):
        for j in range(2):
            captioned(tmp_path / source, f"cats/{j}.png", noise_image(10 * i + j))
        captioned(tmp_path / source, f"own-{source}/0.png", noise_image(100 + i))
    return [str(tmp_path / "shop"), str(tmp_path / "museum")]


@pytest.mark.parametrize(
    ("mode", "groups"),
    [
        ("prefix", {"shop/cats": 2, "museum/cats": 2, "own-shop": 1, "own-museum": 1}),
        ("merge", {"cats": 4, "own-shop": 1, "own-museum": 1}),
    ],
)
def test_a_group_name_in_two_sources_is_prefixed_or_merged_as_chosen(tmp_path: Path, mode: str, groups) -> None:
    sources = two_sources_sharing_a_group(tmp_path)
    flags = [] if mode == "prefix" else ["--group-collision", mode]  # prefix is the default
    assert run_ingest(*sources, "--out", str(tmp_path / "out"), *flags) == 0
    manifest, _, stats = read(tmp_path / "out")
    assert manifest.groupby("group").size().to_dict() == groups
    assert stats["group_collision"] == {"mode": mode, "groups": 1, "names": ["cats"]}


def test_a_group_name_in_two_sources_can_be_an_error(tmp_path: Path, capsys) -> None:
    sources = two_sources_sharing_a_group(tmp_path)
    assert run_ingest(*sources, "--out", str(tmp_path / "out"), "--group-collision", "error") == 2
    assert "1 group name(s) appear in more than one source ('cats'" in capsys.readouterr().err


def square(colour: tuple[int, int, int]) -> Image.Image:
    """A coloured square on white: the same layout whatever the colour."""
    pixels = np.full((128, 128, 3), 255, np.uint8)
    pixels[32:96, 32:96] = colour
    return Image.fromarray(pixels)


def test_colour_variants_are_kept_while_re_encodes_are_near_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for name, colour in {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 220)}.items():
        captioned(root, f"g/{name}.png", square(colour))
    red = square((220, 30, 30))  # its re-encodes sort after it, so red.png is the one kept
    save(red, root / "g/red~q75.jpg", quality=75).with_suffix(".txt").write_text("c")
    captioned(root, "g/red~resized.png", red.resize((100, 100)).resize((128, 128)))
    assert run_ingest(str(root), "--out", str(tmp_path / "out")) == 0
    manifest, rejected, _ = read(tmp_path / "out")
    assert sorted(manifest["uri"]) == ["g/blue.png", "g/green.png", "g/red.png"]
    assert dict(zip(rejected["uri"], rejected["reason"], strict=True)) == {
        "g/red~q75.jpg": "near_duplicate",
        "g/red~resized.png": "near_duplicate",
    }
