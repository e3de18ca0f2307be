"""`easyref generate` promises under adversarial use: reproducible untrained output for a seed (announced loudly),
and one-line errors (exit 2) for damaged checkpoints, decompression bombs and impossible sizes or steps."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from data_fixtures import png_bomb
from safetensors.torch import save_file

from easyref.cli import main
from easyref.config import to_dict
from easyref.model import CheckpointConfig, ModelConfig
from tests.conftest import SMALL_PIXELS, make_group
from tests.train_fixtures import easyref_process


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("refs")
    args = []
    for i, image in enumerate(make_group(4, 2)):
        image.save(folder / f"ref{i}.png")
        args += ["--ref", str(folder / f"ref{i}.png")]
    return args


def generate_args(tiny_models: Path, refs: list[str], out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--base",
        str(tiny_models),
        *refs,
        "--prompt",
        "a ball",
        "--steps",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_generate_without_checkpoint_gives_the_same_image_for_the_same_seed_and_warns(tiny_models, refs, tmp_path):
    procs = [
        easyref_process(
            generate_args(tiny_models, refs, tmp_path / f"{name}.png", "--seed", "3"),
            tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("first", "second")
    ]
    for proc in procs:  # two real runs of the same command, side by side
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "UNTRAINED random weights, initialised from --seed 3" in err
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_truncated_checkpoint_exits_2_naming_the_file(tiny_models, refs, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    record = CheckpointConfig(model=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    (ckpt / "easyref_config.json").write_text(json.dumps(to_dict(record)))
    save_file({"reference_encoder.ref_tokens": torch.zeros(8, 64)}, ckpt / "easyref.safetensors")
    weights = ckpt / "easyref.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(generate_args(tiny_models, refs, tmp_path / "o.png", "--checkpoint", str(ckpt))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{weights}: cannot be read as safetensors" in line and "truncated or damaged" in line
    assert not (tmp_path / "o.png").exists()


def test_truncated_base_model_exits_2_naming_it(tiny_models, refs, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_models, base)
    weights = base / "mllm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(generate_args(base, refs, tmp_path / "o.png")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"base MLLM {base / 'mllm'}: cannot be loaded" in line


def test_decompression_bomb_reference_exits_2_before_decoding(tiny_models, tmp_path, capsys):
    bomb = png_bomb(tmp_path / "bomb.png", 40_000, 40_000)  # 1.6 G pixels claimed in a 60-byte file
    assert main(generate_args(tiny_models, ["--ref", str(bomb)], tmp_path / "o.png")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"reference image {bomb}" in line and "too large" in line
    sliver = tmp_path / "sliver.png"
    make_group(1, 1, size=(1000, 2))[0].save(sliver)
    assert main(generate_args(tiny_models, ["--ref", str(sliver)], tmp_path / "o.png")) == 2
    assert "aspect ratio above 200:1" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--height", "0"], "--height must be between 1 and 4096"),
        (["--width", "-64"], "--width must be between 1 and 4096"),
        (["--height", "100000"], "--height must be between 1 and 4096"),
        (["--steps", "0"], "--steps must be between 1 and 1000"),
        (["--steps", "-5"], "--steps must be between 1 and 1000"),
        (["--steps", "5000"], "--steps must be between 1 and 1000"),
        (["--num-images", "-1"], "--num-images must be between 1 and 64"),
        (["--num-images", "100000"], "--num-images must be between 1 and 64"),
        (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--scale", "inf"], "--scale must be a finite number"),
        (["--device", "gpu:x"], "--device 'gpu:x' is not a torch device"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_impossible_sizes_steps_and_values_exit_2_naming_the_flag(tiny_models, refs, tmp_path, capsys, flags, message):
    assert main(generate_args(tiny_models, refs, tmp_path / "o.png", *flags)) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.png").exists()


def test_a_prompt_longer_than_serving_takes_is_refused_at_once(tiny_models, refs, tmp_path, capsys):
    """One limit for generate and serving (a 100 KB prompt took 171 s: the MLLM reads all of it)."""
    from easyref import captions
    from easyref.registry import pyfunc

    assert pyfunc.MAX_PROMPT_CHARS == captions.MAX_PROMPT_CHARS == 2000
    for flag in ("--prompt", "--negative-prompt"):
        assert main(generate_args(tiny_models, refs, tmp_path / "o.png", flag, "x" * 100_000)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"{flag} is 100,000 characters; give at most 2,000 (the limit serving applies too)" in line
    assert not (tmp_path / "o.png").exists()
    assert main(generate_args(tiny_models, refs, tmp_path / "o.png", "--prompt", "a ball " * 285 + "x" * 5)) == 0


def test_out_that_is_a_folder_exits_2(tiny_models, refs, tmp_path, capsys):
    assert main(generate_args(tiny_models, refs, tmp_path)) == 2
    assert f"--out {tmp_path} is a folder" in _one_error_line(capsys.readouterr().err)
