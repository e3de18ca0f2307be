"""`easyref base-models`: the real profile's models by hub id at pinned revisions, tested against a local fake hub.

The fake hub (tests/fake_hub.py) serves the tiny models under the ids and commits of params.yaml, so the command
runs exactly as it would against huggingface.co (``HF_ENDPOINT``), in its own process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from easyref.atomic import CHECKSUMS, damage
from easyref.base_models import PARTS, HubModel, load_real_models, select_files

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
UNET_FP16 = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture()
def hub(tiny_models: Path, tmp_path: Path):
    import torch
    from fake_hub import FakeHub
    from safetensors.torch import load_file, save_file

    hub = FakeHub()
    repos = tmp_path / "repos"
    for name, model in load_real_models(PARAMS).items():
        folder = repos / name
        source = tiny_models / name
        shutil.copytree(source, folder)
        hub.add_repo(model.repo, model.revision, folder)
    # the SDXL repository holds fp32 and fp16 weights of the UNet, and a pickle the command must never fetch
    sdxl = repos / "sdxl"
    tensors = load_file(sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    # 24 MiB of padding: huggingface_hub writes in 10 MiB chunks, so a connection dropped half-way has kept one
    padding = {"padding": torch.zeros(12 * 1024 * 1024, dtype=torch.float16)}
    save_file({**{k: v.half() for k, v in tensors.items()}, **padding}, sdxl / UNET_FP16)
    (sdxl / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a safetensors file")
    (sdxl / "README.md").write_text("model card\n")
    hub.start()
    yield hub
    hub.stop()


def _run(hub, out: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    cmd = [sys.executable, "-m", "easyref.cli", "base-models", "--out", str(out), "--params", str(PARAMS), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_params_pin_every_part_to_a_commit():
    models = load_real_models(PARAMS)
    assert set(models) == set(PARTS)
    assert all(len(m.revision) == 40 for m in models.values())
    assert models["sdxl"].variant == "fp16"


def test_variant_replaces_the_plain_file_and_pickles_are_never_selected():
    model = HubModel(repo="a/b", revision="0" * 40, files=["unet/*"], variant="fp16")
    files = select_files(
        ["unet/config.json", "unet/m.safetensors", "unet/m.fp16.safetensors", "unet/m.bin", "unet/x.safetensors"],
        model,
    )
    assert files == {
        "unet/config.json": "unet/config.json",
        "unet/m.fp16.safetensors": "unet/m.safetensors",
        "unet/x.safetensors": "unet/x.safetensors",
    }
    with pytest.raises(ValueError, match="commit"):
        HubModel(repo="a/b", revision="main", files=["*"])


def test_downloads_the_layout_from_the_pinned_revisions(hub, tiny_models: Path, tmp_path: Path):
    import torch
    from diffusers import UNet2DConditionModel

    out = tmp_path / "real"
    result = _run(hub, out, tmp_path)
    assert result.returncode == 0, result.stderr
    for part in PARTS:
        assert _tree(out / part) - {".complete", CHECKSUMS} == _tree(tiny_models / part), part
        assert damage(out / part, required=[".complete"]) is None  # written whole by the folder writer
    # only the fp16 variant of the UNet was fetched, laid out under the plain name; no pickle, no model card
    assert hub.gets("/" + UNET_FP16) == 1
    assert hub.gets("/unet/diffusion_pytorch_model.safetensors") == 0
    assert hub.gets(".bin") == 0 and hub.gets("README.md") == 0
    unet = UNet2DConditionModel.from_pretrained(out / "sdxl", subfolder="unet")
    reference = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    weight = unet.conv_in.weight
    assert torch.equal(weight, reference.conv_in.weight.half().to(weight.dtype))
    # a second run fetches nothing
    before = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
    assert _run(hub, out, tmp_path).returncode == 0
    assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == before


def test_an_interrupted_download_resumes(hub, tmp_path: Path):
    out = tmp_path / "real"
    mllm = load_real_models(PARAMS)["mllm"]
    hub.drop_once.add(UNET_FP16)  # the connection drops half-way through the UNet weights
    hub.fail_once.add("model.safetensors")  # the MLLM weights fail: the run stops
    first = _run(hub, out, tmp_path, "--workers", "1")
    assert first.returncode == 2
    assert "run the same command again to resume" in first.stderr
    assert "Traceback" not in first.stderr
    # the dropped file was resumed in the same run with a range request for the missing half
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith(UNET_FP16)]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    assert (out / "sdxl" / ".complete").is_file()
    assert not (out / "mllm").exists()
    mllm_config = f"/{mllm.repo}/resolve/{mllm.revision}/config.json"
    assert hub.gets(mllm_config) == 1

    second = _run(hub, out, tmp_path, "--workers", "1")
    assert second.returncode == 0, second.stderr
    assert hub.gets("/" + UNET_FP16) == 2  # not fetched again
    assert hub.gets(mllm_config) == 1  # completed before the failure: checked, not fetched again
    assert (out / "mllm" / "model.safetensors").is_file()
    assert (out / ".complete").is_file()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])  # an LFS sha256 and a git blob id
def test_bytes_that_differ_from_the_hubs_recorded_hash_are_refused_and_refetched(hub, tmp_path: Path, name: str):
    out = tmp_path / "real"
    hub.corrupt.add(name)  # zeros of the right length; the listing and HEAD still advertise the true hash
    first = _run(hub, out, tmp_path, "--parts", "dino")
    assert first.returncode == 2, first.stderr
    err = first.stderr.strip().splitlines()[-1]  # after huggingface_hub's progress bars
    assert err.startswith("easyref base-models: error:") and "Traceback" not in first.stderr
    assert f"dino: {name} of facebook/dinov2-small" in err and "the hub records" in err
    assert not (out / "dino").exists() and not (out / ".hub" / "dino" / name).exists()
    hub.corrupt.clear()
    second = _run(hub, out, tmp_path, "--parts", "dino")
    assert second.returncode == 0, second.stderr
    assert (out / "dino" / name).read_bytes() == (hub.repos[_dino_key()] / name).read_bytes()


def test_a_listed_name_that_leads_out_of_the_folder_is_one_line_naming_it(hub, tmp_path: Path):
    hub.extra_files["../escape.json"] = b"{}"
    result = _run(hub, tmp_path / "real", tmp_path, "--parts", "dino")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and "'../escape.json'" in err and err.startswith("easyref")
    assert not (tmp_path / "escape.json").exists() and not list(tmp_path.rglob("escape.json"))


def _dino_key() -> tuple[str, str]:
    dino = load_real_models(PARAMS)["dino"]
    return dino.repo, dino.revision


def test_an_unknown_revision_names_the_params_key(hub, tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "profile:\n  real_models:\n    dino: {repo: facebook/dinov2-small, revision: '"
        + "f" * 40
        + "', files: ['*']}\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        "-m",
        "easyref.cli",
        "base-models",
        "--params",
        str(params),
        "--out",
        str(tmp_path / "o"),
        "--parts",
        "dino",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "profile.real_models.dino" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_params_are_one_line_errors(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("profile:\n  real_models:\n    sdxl: {repo: a/b, revision: main, files: ['*']}\n")
    result = subprocess.run(
        [sys.executable, "-m", "easyref.cli", "base-models", "--params", str(params), "--out", str(tmp_path / "o")],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "profile.real_models.sdxl" in result.stderr and "40 hex digits" in result.stderr
    assert "Traceback" not in result.stderr
