"""Trained weights survive the save that replaces them: a process killed (SIGKILL) inside the final save, or a full
disk while a checkpoint is written, leaves the previous one intact and verifiable. Tiny models on CPU, real
training runs; the kill is a real SIGKILL of a real process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easyref.atomic import CHECKSUMS, FolderWriter, damage
from easyref.cli import main
from easyref.model import read_checkpoint_config
from tests.train_fixtures import copy_run, train_args, train_workspace

ERROR = "easyref train: error: "


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models) -> Path:
    with train_workspace(tmp_path_factory.mktemp("ckpt_writes"), tiny_models) as root:
        yield root


@pytest.fixture(scope="module")
def one_step(work) -> Path:
    """One step: checkpoint step_00000001 and OUT/final of step 1."""
    out = work / "one_step"
    assert main(train_args(work, out, "--max-steps", "1")) == 0
    return out


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# The child trains like `easyref train` and SIGKILLs itself at KILL_AT inside the save of OUT/final:
#   written  - the weights are in .final.tmp, nothing checksummed yet
#   swapping - the old final is set aside as .final.old, the new one not yet renamed into place
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from easyref import atomic

    point, real_save, real_rename = os.environ["KILL_AT"], atomic.FolderWriter.save_tensors, Path.rename

    def save_tensors(self, name, tensors, metadata=None):
        path = real_save(self, name, tensors, metadata)
        if point == "written" and self.target.name == "final":
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def rename(self, target):
        if point == "swapping" and self.name == ".final.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(self, target)

    atomic.FolderWriter.save_tensors, Path.rename = save_tensors, rename
    from easyref.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("kill_at", ["written", "swapping"])
def test_sigkill_inside_the_final_save_leaves_the_previous_final_intact(work, one_step, tmp_path, kill_at):
    out = copy_run(one_step, tmp_path / "run")
    before = contents(out / "final")
    assert CHECKSUMS in before
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "KILL_AT": kill_at}
    proc = subprocess.run(
        [sys.executable, str(child), *train_args(work, out, "--max-steps", "2")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "checkpoints" / "step_00000002").is_dir()  # it was killed in the final save, after step 2
    if kill_at == "swapping":
        assert not (out / "final").exists() and (out / ".final.old").is_dir()  # the window between the renames
    # reading the final finds the previous one, whole: its checksums verify and its bytes are the old ones
    record = read_checkpoint_config(out / "final")
    assert record.extra["step"] == 1 and damage(out / "final") is None
    assert contents(out / "final") == before
    # the next run replaces it cleanly and leaves nothing beside it
    assert main(train_args(work, out, "--max-steps", "2")) == 0
    assert read_checkpoint_config(out / "final").extra["step"] == 2 and damage(out / "final") is None
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == ["final"]


def _full_disk_on(folder_name: str):
    """A FolderWriter whose file writes into ``folder_name`` hit a full disk after a partial write."""
    real = FolderWriter.save_tensors

    def save_tensors(self, name, tensors, metadata=None):
        if self.path.name == folder_name and name != "rng_rank0.safetensors":
            (self.path / name).write_bytes(b"\0" * 1000)  # what a full disk leaves: a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))
        return real(self, name, tensors, metadata)

    return save_tensors


@pytest.mark.parametrize(
    ("folder", "kept"),
    [
        (".step_00000002.tmp", "the last checkpoint, step_00000001, is intact"),
        (".final.tmp", "the previous final is intact"),
    ],
)
def test_full_disk_while_saving_keeps_the_previous_and_cleans_the_temp_folder(
    work, one_step, tmp_path, monkeypatch, capsys, folder, kept
):
    out = copy_run(one_step, tmp_path / "run")
    step1, final = contents(out / "checkpoints" / "step_00000001"), contents(out / "final")
    monkeypatch.setattr(FolderWriter, "save_tensors", _full_disk_on(folder))
    capsys.readouterr()
    assert main(train_args(work, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err  # (in process, progress bars share stderr: take the error line itself)
    lines = [line[line.index(ERROR) :] for line in err.splitlines() if ERROR in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "cannot be written (No space left on device [ENOSPC] writing " in lines[0] and kept in lines[0], lines[0]
    assert f"the partial {folder} was removed" in lines[0]
    assert not list(out.rglob("*.tmp"))  # the partial folder is gone
    assert contents(out / "checkpoints" / "step_00000001") == step1 and contents(out / "final") == final
    assert damage(out / "checkpoints" / "step_00000001") is None and damage(out / "final") is None
    # the run resumes from the intact checkpoint once there is room again
    monkeypatch.undo()
    assert main(train_args(work, out, "--max-steps", "2")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "final" / "easyref_config.json").read_text())["extra"]["step"] == 2
