"""The one folder writer (easyref.atomic): whole or not at all, checksummed, the old folder kept until the new one is
in place, failures cleaned up and said in one line."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from easyref.atomic import CHECKSUMS, FolderWriter, atomic_folder, damage, restore_interrupted, verify_folder
from easyref.errors import UserError


def write(target: Path, **files: str) -> Path:
    with atomic_folder(target, required=tuple(files)) as writer:
        for name, text in files.items():
            writer.write_text(name, text)
    return target


def test_writes_checksums_that_sha256sum_accepts_and_replaces_the_old_folder(tmp_path):
    target = write(tmp_path / "out", a="one", b="two")
    (target / "sub").mkdir()
    write(target, a="three")  # replaced whole: the old folder's files (and subfolder) are gone
    assert sorted(p.name for p in target.iterdir()) == ["a", CHECKSUMS]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp, no .out.old
    checked = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=target, capture_output=True, text=True)
    assert checked.returncode == 0 and "a: OK" in checked.stdout
    verify_folder(target, required=["a"])


def test_nested_files_are_covered(tmp_path):
    with atomic_folder(tmp_path / "model") as writer:
        (writer.path / "unet").mkdir()
        (writer.path / "unet" / "w.bin").write_bytes(b"weights")
    assert damage(tmp_path / "model", required=["unet/w.bin"]) is None
    (tmp_path / "model" / "unet" / "w.bin").write_bytes(b"weightz")
    assert damage(tmp_path / "model") == "unet/w.bin does not match its recorded SHA-256 (truncated, damaged or edited)"


def test_an_error_inside_leaves_the_old_folder_and_no_temp(tmp_path):
    target = write(tmp_path / "out", a="old")
    with pytest.raises(ZeroDivisionError), atomic_folder(target) as writer:
        writer.write_text("a", "half")
        1 / 0  # noqa: B018
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_is_one_line_saying_what_is_intact(tmp_path, monkeypatch):
    target = write(tmp_path / "final", a="old")

    def full(self, name, text):
        (self.path / name).write_text(text[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))

    monkeypatch.setattr(FolderWriter, "write_text", full)
    with pytest.raises(UserError) as info:
        write(target, a="new")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{target}: cannot be written (No space left on device [ENOSPC]")
    assert "the previous final is intact and the partial .final.tmp was removed" in message
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_crash_between_the_renames_is_undone_by_the_next_reader_or_writer(tmp_path):
    target = write(tmp_path / "final", a="old")
    target.rename(tmp_path / ".final.old")  # what a kill after the first rename leaves
    (tmp_path / ".final.tmp").mkdir()
    assert restore_interrupted(target) and (target / "a").read_text() == "old"
    target.rename(tmp_path / ".final.old")
    write(target, a="new")  # the writer restores first, then replaces as usual
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_damaged_set_aside_folder_is_not_restored(tmp_path):
    aside = write(tmp_path / ".final.old", a="old")
    (aside / "a").write_text("edited")
    assert not restore_interrupted(tmp_path / "final") and not (tmp_path / "final").exists()


def test_a_folder_without_a_listing_is_accepted_and_a_malformed_one_refused(tmp_path):
    folder = tmp_path / "by_hand"
    folder.mkdir()
    verify_folder(folder)  # assembled by hand or before the writer existed: nothing to check against
    (folder / CHECKSUMS).write_text(f"{'0' * 64}  ../escape\n")
    with pytest.raises(UserError, match=r"checksums.sha256 is malformed"):
        verify_folder(folder)
