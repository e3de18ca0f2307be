"""CPU threads are chosen on purpose: each process gets its share of the cores (cores / local processes), an
explicit setting wins, and every entry point (train, evaluate, generate) applies the choice before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from easyref.errors import UserError
from easyref.threads import available_cores, choose_threads


def test_each_local_process_gets_its_share_of_the_cores() -> None:
    assert choose_threads(environ={"LOCAL_WORLD_SIZE": "2"}, cores=2)[0] == 1
    assert choose_threads(environ={"LOCAL_WORLD_SIZE": "4"}, cores=16)[0] == 4
    assert choose_threads(environ={"LOCAL_WORLD_SIZE": "8"}, cores=2)[0] == 1  # never 0
    assert choose_threads(environ={}, cores=6)[0] == 6  # a plain process: all cores
    assert choose_threads(local_world_size=3, environ={}, cores=6)[0] == 2


def test_an_explicit_setting_wins_and_a_bad_one_is_a_user_error() -> None:
    env = {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}
    assert choose_threads(environ=env, cores=8) == (3, "OMP_NUM_THREADS")
    assert choose_threads(environ=env | {"EASYREF_THREADS": "5"}, cores=8) == (5, "EASYREF_THREADS")
    assert choose_threads(threads=7, environ=env | {"EASYREF_THREADS": "5"}, cores=8) == (7, "--threads")
    for bad in ("0", "-1", "two"):
        with pytest.raises(UserError, match="EASYREF_THREADS"):
            choose_threads(environ={"EASYREF_THREADS": bad}, cores=2)


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a Kubernetes limit of 1.5 CPUs
    assert available_cores(quota) == min(2, available_cores(tmp_path / "absent"))
    quota.write_text("max 100000\n")
    assert available_cores(quota) == available_cores(tmp_path / "absent")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--stage", "pretrain", "--out", "{tmp}/run", "--data", "{tmp}/missing"],
        ["evaluate", "--checkpoint", "{tmp}/missing", "--split", "{tmp}/missing.parquet", "--out", "{tmp}/eval"],
        ["generate", "--base", "{tmp}/missing", "--ref", "{tmp}/missing.png", "--prompt", "p", "--out", "{tmp}/o.png"],
    ],
    ids=["train", "evaluate", "generate"],
)
def test_every_entry_point_sets_one_thread_per_process_under_two_local_processes(argv: list[str], tmp_path: Path):
    """As under `torchrun --nproc_per_node N` with N = the cores: one thread each (torch's default is all cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "EASYREF_THREADS")}
    env |= {"LOCAL_WORLD_SIZE": str(available_cores()), "RANK": "0"}
    args = [a.format(tmp=tmp_path) for a in argv]
    done = subprocess.run([sys.executable, "-m", "easyref.cli", *args], env=env, capture_output=True, text=True)
    assert f"CPU threads per process: 1 ({available_cores()} cores / {available_cores()} local" in done.stderr, (
        done.stderr[-2000:]
    )
    assert done.returncode == 2  # then the missing input is reported as a user error
