"""First use of a clone: the README says how to reach the programs `make setup` put in .venv (and every program it
names is one of them), and how to keep a `make demo` result (commit dvc.lock, which git must not ignore)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SYSTEM = {"make", "git", "cat", "source", "export", "cd", "kubectl", "docker"}
"""Programs of the machine, not of the environment."""


def readme_commands() -> list[tuple[int, str]]:
    """``(offset in README, program)`` of every command line in its bash blocks (heredoc bodies skipped)."""
    found = []
    for block in re.finditer(r"```bash\n(.*?)```", README, re.S):
        heredoc, at = None, block.start(1)
        for line in block.group(1).splitlines(keepends=True):
            at += len(line)
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            words = line.split()
            if not words or words[0].startswith("#") or line.startswith((" ", "\t")):
                continue  # comments and continuation lines
            found.append((at - len(line), words[0]))
            marker = re.search(r"<<'?(\w+)'?", line)
            heredoc = marker.group(1) if marker else None
    return found


def test_every_program_the_readme_names_is_one_make_setup_installs() -> None:
    venv_bin = Path(sys.executable).parent  # the environment `make setup` builds (.venv; the tests run in it)
    programs = {p.removeprefix(".venv/bin/") for _, p in readme_commands()}
    assert {"easyref", "dvc", "make"} <= programs
    missing = [p for p in programs - SYSTEM if not (venv_bin / p).exists()]
    assert missing == [], f"README commands not installed in {venv_bin}: {missing}"


def test_the_readme_says_how_to_reach_them_before_it_first_uses_one() -> None:
    activate = README.index("source .venv/bin/activate")
    bare = [at for at, program in readme_commands() if program not in SYSTEM and not program.startswith(".venv/")]
    assert bare and activate < min(bare)
    assert ".venv/bin/easyref" in README  # the other way: the program's path, without activating


def test_dvc_lock_can_be_committed_and_the_demo_says_how() -> None:
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=ROOT)
    assert ignored.returncode == 1, "dvc.lock is git-ignored: a demo result could not be committed"
    assert "git add dvc.lock" in README
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    recipe = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "git add dvc.lock" in recipe and "bin/activate" in recipe


def test_dvc_plots_show_draws_the_loss_curve_without_network(tmp_path: Path) -> None:
    """`dvc plots show`'s Vega panels load their scripts from a CDN (blank offline); the loss curve that
    pipelines/loss_history.py also draws as PNG is copied beside the page and shows without network access."""
    from PIL import Image

    from pipelines.loss_history import draw_curve

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    points = [(step, 1.0 / step) for step in range(1, 40)]
    (tmp_path / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in points))
    draw_curve(points, tmp_path / "loss.png", "pretrain: training loss")
    (tmp_path / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n  - loss.png\n")
    subprocess.run([dvc, "plots", "show", "-o", "out"], cwd=tmp_path, check=True, capture_output=True)
    html = (tmp_path / "out" / "index.html").read_text()
    assert re.search(r'<script[^>]+src="https://', html)  # the Vega panel: needs the network
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images and not [i for i in images if "://" in i]
    drawn = Image.open(tmp_path / "out" / images[0]).convert("RGB")
    assert sum(1 for pixel in drawn.getdata() if pixel == (70, 110, 190)) > 200  # the curve, not a blank frame
