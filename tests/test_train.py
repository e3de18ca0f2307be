"""Training on the tiny models, CPU, real processes: stage runs, the stage chain, torchrun, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from components.testing import built_once, mlflow_store
from easyref.errors import UserError
from easyref.model import ModelConfig
from tests.conftest import SMALL_PIXELS, make_group

RESOLUTION = 32  # 16x16 latents on the tiny UNet: fast enough for several steps per test


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def tracking_uri(workdir) -> str:
    """One MLflow database for the module (creating its tables takes seconds)."""
    uri = mlflow_store(workdir / "mlflow.db")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def groups_dir(workdir) -> Path:
    return write_groups_dir(workdir / "groups")


def write_groups_dir(root: Path) -> Path:
    """Three groups of three images in the demo-data folder layout."""
    lines = []
    for g in range(3):
        (root / f"group{g}").mkdir(parents=True)
        for i, image in enumerate(make_group(g, 3)):
            image.save(root / f"group{g}" / f"{i:03d}.png")
            lines.append(json.dumps({"image": f"group{g}/{i:03d}.png", "caption": f"shape of group {g}" + LONG}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


# longer than the text encoders' 77 tokens: training cuts and counts them (MLflow metric captions_truncated)
LONG = ", drawn with a thin pen on grey paper beside a blue circle and a green triangle" * 2


@pytest.fixture(scope="module")
def params_file(workdir, tiny_models, groups_dir) -> Path:
    return write_params_file(workdir / "params.yaml", tiny_models, groups_dir)


def write_params_file(path: Path, tiny_models: Path, groups_dir: Path) -> Path:
    params = {
        "model": {"num_tokens": 8, **SMALL_PIXELS},
        "train": {
            "base": str(tiny_models), "data": str(groups_dir), "resolution": RESOLUTION, "batch_size": 2,
            "preview_steps": 2, "preview_samples": 2, "preview_every": -1, "lora_rank": 4,
        },
    }
    path.write_text(yaml.safe_dump(params))
    return path


def _config(tiny_models, groups_dir, **kw):
    from easyref.train.config import TrainConfig

    base = dict(base=str(tiny_models), data=str(groups_dir), resolution=RESOLUTION, batch_size=2, preview_steps=2,
                preview_samples=2, model=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def stage1(workdir, tiny_models, groups_dir, tracking_uri):
    from easyref.train.loop import train

    config = _config(tiny_models, groups_dir, max_steps=3, save_every=1, keep_last=2, preview_every=2)
    return train(config, out=workdir / "stage1")


# -- configuration and pure parts ---------------------------------------------------------------------------------


def test_stage_defaults_and_params_merging(tmp_path):
    from easyref.train.config import load_train_config

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"batch_size": 4, "single_ref": {"max_steps": 7}}, "model": {"num_tokens": 16}}))
    pre = load_train_config(path, "pretrain")
    single = load_train_config(path, "single_ref", {"grad_accum": 3, "lr": None})
    multi = load_train_config(path, "multi_ref")
    assert (pre.lr, single.lr, multi.lr) == (1e-4, 4e-5, 2e-5)
    assert pre.parts == ["reference", "adapter"] and set(single.parts) == {"reference", "adapter", "mllm", "lora"}
    assert single.max_steps == 7 and single.grad_accum == 3 and single.batch_size == 4 and pre.max_steps == 1000
    assert pre.model.num_tokens == 16 and single.lora_rank == 128
    assert single.global_batch(world_size=2) == 24
    assert (pre.drop_text, pre.drop_image, pre.drop_both) == (0.1, 0.1, 0.1)
    path.write_text(yaml.safe_dump({"train": {"batch_sise": 4}}))
    with pytest.raises(UserError, match="unknown key.*batch_sise"):
        load_train_config(path, "pretrain")


def test_global_order_is_independent_of_world_size_and_resumable():
    from easyref.train.data import GlobalOrderSampler

    def order(world, start, accum=1, batch=2):
        per_rank = [[k.index for k in GlobalOrderSampler(7, seed=3, batch_size=batch, grad_accum=accum, rank=r, world_size=world,
                                            start_step=start, max_steps=6)] for r in range(world)]
        steps = []
        for s in range(6 - start):  # interleave ranks micro-batch by micro-batch, as the global order defines
            for m in range(accum):
                for r in range(world):
                    chunk = per_rank[r][(s * accum + m) * batch:(s * accum + m + 1) * batch]
                    steps.extend(chunk)
        return steps

    single = order(1, 0, accum=2)
    assert order(2, 0) == single
    assert order(2, 2) == single[2 * 4:]  # resuming at step 2 continues exactly
    assert sorted(single[:7]) == list(range(7))  # each epoch is a permutation


def test_cfg_drops_are_exclusive_with_the_configured_rates():
    from easyref.train.recipe import draw_drops, step_generator

    text, image = draw_drops(20000, 0.1, 0.1, 0.1, step_generator(0, 0, 0, 0))
    both = sum(t and i for t, i in zip(text, image, strict=True)) / 20000
    only_text = sum(t and not i for t, i in zip(text, image, strict=True)) / 20000
    only_image = sum(i and not t for t, i in zip(text, image, strict=True)) / 20000
    for rate in (both, only_text, only_image):
        assert abs(rate - 0.1) < 0.01
    assert draw_drops(5, 0.1, 0.1, 0.1, step_generator(1, 2, 0, 0)) == draw_drops(5, 0.1, 0.1, 0.1, step_generator(1, 2, 0, 0))


def test_offset_noise_moves_each_latent_channel_as_a_whole():
    """Offset noise (`train.noise_offset`): one normal draw per sample and channel on top of the pixel noise, so a
    channel's mean over a 16x16 latent varies by about the offset (0.3) instead of 1/16; 0 draws the plain noise."""
    from easyref.train.recipe import step_generator, training_noise

    shape = torch.Size((512, 4, 16, 16))
    plain = training_noise(shape, 0.0, step_generator(0, 0, 0, 0))
    assert torch.equal(plain, torch.randn(shape, generator=step_generator(0, 0, 0, 0)))
    offset = training_noise(shape, 0.3, step_generator(0, 0, 0, 0))
    shift = offset - plain  # the same for every pixel of a channel
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
    assert abs(float(plain.mean((2, 3)).std()) - 1 / 16) < 0.01
    assert abs(float(offset.mean((2, 3)).std()) - (0.3**2 + 1 / 256) ** 0.5) < 0.02


def test_training_draws_the_configured_offset_noise(workdir, tiny_models, groups_dir, tracking_uri):
    """`train.noise_offset` reaches the training step: the same seed and step with offset noise gives another loss,
    and training twice with it gives the same loss (the offset comes from the step's generator too)."""
    from easyref.train.loop import train

    def first_loss(name: str, offset: float) -> float:
        config = _config(tiny_models, groups_dir, max_steps=1, save_every=0, preview_every=-1, noise_offset=offset)
        return train(config, out=workdir / name).losses[0]

    plain, offset = first_loss("plain_noise", 0.0), first_loss("offset_noise", 3.0)
    assert offset != plain
    assert first_loss("offset_noise_again", 3.0) == offset


def test_the_trainer_is_freed_before_the_process_group_ends(workdir, tiny_models, groups_dir, tracking_uri,
                                                           monkeypatch):
    """`train()` frees the trainer (and with it a DDP wrapper, which holds the process group) before `teardown()`:
    a gloo group destroyed later, wherever the wrapper happened to be freed, could deadlock with its own worker
    threads (the GIL against the group's work lock; see `distributed.teardown`)."""
    import gc

    from easyref.train import distributed as D
    from easyref.train import loop

    alive_at_teardown = []
    real_teardown = D.teardown

    def teardown(*args, **kwargs):
        alive_at_teardown.append(sum(isinstance(o, loop.Trainer) for o in gc.get_objects()))
        real_teardown(*args, **kwargs)

    monkeypatch.setattr(D, "teardown", teardown)
    config = _config(tiny_models, groups_dir, max_steps=1, save_every=0, preview_every=-1)
    loop.train(config, out=workdir / "freed_before_teardown")
    assert alive_at_teardown == [0]


def test_trainjob_manifest_structure():
    from easyref.cli import build_parser
    from easyref.train.launch import config_from_args, render_trainjob

    args = build_parser("launch").parse_args([
        "launch", "--stage", "single_ref", "--image", "registry/easyref:1", "--nodes", "4", "--gpus-per-node", "8",
        "--pvc", "easyref-shared", "--mount-path", "/mnt/easyref", "--env", "MLFLOW_TRACKING_URI=http://mlflow:5000",
        "--secret-env", "AWS_SECRET_ACCESS_KEY=easyref-s3:secret_access_key",
        "--init", "/mnt/easyref/runs/pretrain/final", "--out", "/mnt/easyref/runs/single_ref",
        "--", "--max-steps", "80000",
    ])
    job = render_trainjob(config_from_args(args))
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "easyref-single-ref"
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "easyref-torch-distributed" and job["metadata"]["namespace"] == "easyref"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 4 and trainer["image"] == "registry/easyref:1"
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["command"][:4] == ["torchrun", "-m", "easyref.cli", "train"]
    assert trainer["command"][-2:] == ["--max-steps", "80000"]
    assert "/mnt/easyref/runs/pretrain/final" in trainer["command"]
    env = {e["name"]: e for e in trainer["env"]}
    secret = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "easyref-s3", "key": "secret_access_key"}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["name"] == "node"
    pod = patch["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "easyref-shared"
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/dev/shm", "/mnt/easyref"} <= mounts and pod["containers"][0]["name"] == "node"


# -- in-process training ------------------------------------------------------------------------------------------


def test_stage1_writes_resumable_checkpoints_and_a_loadable_final(stage1, workdir, tiny_models):
    from easyref.model import load_model, read_checkpoint_config
    from easyref.train.checkpoint import list_checkpoints

    assert stage1.step == 3 and len(stage1.losses) == 3 and all(x > 0 for x in stage1.losses)
    kept = list_checkpoints(workdir / "stage1")
    assert [p.name for p in kept] == ["step_00000002", "step_00000003"]  # keep_last=2
    assert not list((workdir / "stage1" / "checkpoints").glob(".*tmp"))
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["step"] == 3 and state["data"]["samples_seen"] == 6
    record = read_checkpoint_config(stage1.final)
    assert record.parts == ["adapter", "reference"] and record.extra["stage"] == "pretrain"
    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=stage1.final)
    trained = load_file(kept[-1] / "trainable.safetensors")
    key = "reference_encoder.ref_tokens"
    assert torch.equal(model.state_dict()[key], trained[key])


def test_mlflow_run_has_params_metrics_tags_and_previews(stage1, tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(stage1.run_id)
    assert run.data.params["lr"] == "0.0001" and run.data.params["model.num_tokens"] == "8"
    assert run.data.params["global_batch"] == "2"
    assert {"loss", "lr", "samples_per_s", "step_time_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(stage1.run_id, "loss")) == 3
    tags = run.data.tags
    assert tags["stage"] == "pretrain" and tags["world_size"] == "1" and len(tags["data_manifest_hash"]) == 16
    assert "git_commit" in tags and tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert run.info.run_name == f"pretrain-{stage1.run_id[:8]}"
    # every caption is long; the ones the CFG drop did not empty were cut, and counted
    assert 0 < run.data.metrics["captions_truncated"] <= run.data.metrics["captions_encoded"] == 6
    previews = [a.path for a in client.list_artifacts(stage1.run_id, "previews")]
    assert previews == ["previews/step_00000002.png"]


def test_resume_continues_where_the_checkpoint_left_off(stage1, workdir, tiny_models, groups_dir):
    from easyref.train.loop import train

    config = _config(tiny_models, groups_dir, max_steps=4, save_every=1, keep_last=2, preview_every=-1)
    result = train(config, out=workdir / "stage1")
    assert result.start_step == 3 and result.step == 4 and result.run_id == stage1.run_id


def test_stage_chain_pretrain_to_single_ref_via_cli(stage1, workdir, params_file):
    from easyref.cli import main
    from easyref.model import read_checkpoint_config

    out = workdir / "single"
    code = main(["train", "--stage", "single_ref", "--params", str(params_file), "--init", str(stage1.final),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "1", "--save-every", "0"])
    assert code == 0
    record = read_checkpoint_config(out / "final")
    assert record.parts == ["adapter", "lora", "mllm", "reference"] and record.model.lora_rank == 4
    assert not (out / "checkpoints").exists()


def test_nan_loss_stops_without_saving(workdir, tiny_models, groups_dir, tracking_uri):
    from easyref.train.data import FolderGroups
    from easyref.train.loop import TrainingDiverged, train

    class Poisoned(FolderGroups):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            sample["target"] = torch.full_like(sample["target"], float("nan"))
            return sample

    out = workdir / "nan"
    config = _config(tiny_models, groups_dir, max_steps=2, save_every=1, preview_every=-1)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 1"):
        train(config, out=out, dataset=Poisoned(groups_dir, RESOLUTION))
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_mismatched_or_missing_init_fails_fast_naming_tensors(stage1, workdir, params_file, capsys):
    from easyref.cli import main

    bad = workdir / "bad_init"
    bad.mkdir()
    (bad / "easyref_config.json").write_text((stage1.final / "easyref_config.json").read_text())
    tensors = load_file(stage1.final / "easyref.safetensors")
    tensors["reference_encoder.ref_tokens"] = torch.zeros(3, 5)
    tensors.pop("unet.encoder_hid_proj.image_projection_layers.0.net.0.bias")
    save_file(tensors, bad / "easyref.safetensors")
    args = ["train", "--stage", "single_ref", "--params", str(params_file), "--out", str(workdir / "never")]
    assert main([*args, "--init", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch reference_encoder.ref_tokens" in err
    assert "missing (1): unet.encoder_hid_proj.image_projection_layers.0.net.0.bias" in err
    assert main([*args, "--init", str(workdir / "nowhere")]) == 2
    assert "not an EasyRef checkpoint" in capsys.readouterr().err
    assert not (workdir / "never").exists()


# -- real processes: torchrun ---------------------------------------------------------------------------------------

DDP_STEPS = 10


def _torchrun(params_file: Path, out: Path, tracking_uri: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
           "-m", "easyref.cli", "train", "--stage", "pretrain", "--params", str(params_file), "--out", str(out),
           "--max-steps", str(DDP_STEPS), "--save-every", "2", "--batch-size", "1"]
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_models) -> Path:
    """The uninterrupted two-process run, once per test run: both xdist workers used to train it (40 s each on a
    loaded machine). Its inputs are written as every worker writes its own (the same tiny models, the same groups,
    the same settings), so the sigkill test's run in a worker's folder can be compared with it."""

    def run(folder: Path) -> None:
        params = write_params_file(folder / "params.yaml", tiny_models, write_groups_dir(folder / "groups"))
        proc = _torchrun(params, folder / "ddp", mlflow_store(folder / "mlflow.db"))
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-4000:]

    return built_once(tmp_path_factory, "train-ddp-reference", run) / "ddp"


def test_torchrun_two_processes_finishes(ddp_reference):
    from easyref.train.checkpoint import latest_checkpoint

    state = json.loads((latest_checkpoint(ddp_reference) / "state.json").read_text())
    assert state["step"] == DDP_STEPS and state["world_size"] == 2 and state["data"]["global_batch"] == 2
    assert (ddp_reference / "final" / "easyref.safetensors").is_file()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_sigkill_of_a_worker_resumes_and_matches_the_uninterrupted_run(ddp_reference, workdir, params_file, tracking_uri):
    out = workdir / "ddp_killed"
    proc = _torchrun(params_file, out, tracking_uri, "--max-restarts", "1")
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000002" / "state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    assert not (out / "final").exists(), "the run finished before it could be interrupted"
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert "resuming from" in log
    state = json.loads((out / "checkpoints" / f"step_{DDP_STEPS:08d}" / "state.json").read_text())
    assert state["step"] == DDP_STEPS
    expected = load_file(ddp_reference / "final" / "easyref.safetensors")
    got = load_file(out / "final" / "easyref.safetensors")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
