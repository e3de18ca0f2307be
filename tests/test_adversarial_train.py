"""Training promises under adversarial use: one writer per --out, no silent mixing of runs on resume, damaged
checkpoints detected and skipped, damaged --init reported. Tiny models on CPU, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from easyref.cli import main
from easyref.locking import HOLDER_NAME, output_lock
from tests.train_fixtures import (
    copy_run,
    easyref_process,
    easyref_run,
    message_lines,
    train_args,
    train_workspace,
    write_groups,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models) -> Path:
    with train_workspace(tmp_path_factory.mktemp("adv_train"), tiny_models) as root:
        yield root


@pytest.fixture(scope="module")
def base_run(work) -> Path:
    """Two steps, a checkpoint after each (keep_last 2): step_00000001 and step_00000002."""
    out = work / "base"
    assert main(train_args(work, out, "--max-steps", "2")) == 0
    return out


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step_{n:08d}"


# -- one writer per --out ---------------------------------------------------------------------------------------


def test_second_train_into_the_same_out_is_refused_naming_the_first(work):
    out = work / "shared_out"
    first = easyref_process(
        train_args(work, out, "--max-steps", "100000", "--save-every", "0"),
        work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / HOLDER_NAME).exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = easyref_run(train_args(work, out, "--max-steps", "1"), work)
        assert second.returncode == 2, second.stderr
        lines = message_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"is being written by train (pid {first.pid} on " in lines[0]
        assert not (out / "final").exists()  # the refused run wrote nothing
    finally:
        first.kill()
        first.wait(timeout=60)
    # the kernel dropped the killed run's lock: the folder can be written again (as after an elastic restart)
    with output_lock(out, "train", timeout=10):
        pass


def test_torchrun_job_into_a_locked_out_stops_on_every_rank(work, tmp_path):
    out = tmp_path / "locked"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "easyref.cli",
        *train_args(work, out, "--max-steps", "1", "--batch-size", "1"),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with output_lock(out, "ingest"):  # this test process is the first writer
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    # counted in the whole log, not per line: the two ranks write to one pipe and their lines can interleave
    refusals = log.count(f"is being written by ingest (pid {os.getpid()}")
    assert refusals == 2, log[-3000:]  # rank 0 was refused and told rank 1, which stopped too (no hang)
    assert not (out / "checkpoints").exists()


# -- resume only the same run -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "change"),
    [
        (["--seed", "7"], "seed: 0 -> 7"),
        (["--lr", "0.001"], "lr: 0.0001 -> 0.001"),
        (["--batch-size", "1"], "global_batch: 2 -> 1"),
        (["--resolution", "16"], "resolution: 32 -> 16"),
        (["--data", "OTHER"], "data: "),
    ],
    ids=["seed", "lr", "batch", "resolution", "data"],
)
def test_resume_with_different_settings_is_refused_naming_each_change(work, base_run, tmp_path, capsys, flags, change):
    if "OTHER" in flags:
        flags = ["--data", str(write_groups(tmp_path / "other_groups", groups=2, per_group=4))]
    out = copy_run(base_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in [*(out / "checkpoints").iterdir(), out / "final"]}
    assert main(train_args(work, out, "--max-steps", "3", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(message_lines(err)) == 1 and change in err and "--allow-config-change" in err, err
    assert str(step(out, 2)) in err
    assert {p.name: p.stat().st_mtime_ns for p in [*(out / "checkpoints").iterdir(), out / "final"]} == before


def test_resume_on_re_made_base_models_is_refused(work, base_run, tiny_models, tmp_path, capsys):
    """A base re-made behind the same folder layout (as `easyref tiny-models` after a re-pretrained part) is another
    run's ground: resuming the adapter trained on the old one would mix the two silently."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_models / "sdxl", base / "sdxl")
    shutil.copytree(tiny_models / "mllm", base / "mllm")
    weights = base / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors = {k: (v + 1e-3 if k == "conv_out.bias" else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == (tiny_models / "sdxl/unet/diffusion_pytorch_model.safetensors").stat().st_size
    out = copy_run(base_run, tmp_path / "run")
    assert main(train_args(work, out, "--max-steps", "3", "--base", str(base))) == 2
    err = capsys.readouterr().err.strip()
    assert "base: " in err and "--allow-config-change" in err, err
    # the same models copied elsewhere are the same base: resumed
    shutil.copy2(tiny_models / "sdxl/unet/diffusion_pytorch_model.safetensors", weights)
    assert main(train_args(work, out, "--max-steps", "3", "--base", str(base))) == 0
    assert "resuming from" in capsys.readouterr().out


def test_allow_config_change_logs_the_changes_and_applies_the_new_lr(work, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    assert main(train_args(work, out, "--max-steps", "3", "--lr", "0.003", "--allow-config-change")) == 0
    err = capsys.readouterr().err
    assert "--allow-config-change: resuming with changed settings" in err and "lr: 0.0001 -> 0.003" in err
    latest = step(out, 3)
    optimizer = json.loads((latest / "optimizer.json").read_text())
    assert {g["lr"] for g in optimizer["param_groups"]} == {0.003}  # the new lr, not the checkpoint's
    state = json.loads((latest / "state.json").read_text())
    assert state["settings"]["lr"] == 0.003 and len(state["settings_hash"]) == 64
    from mlflow.tracking import MlflowClient

    run_id = state["mlflow_run_id"]
    history = {m.step: m.value for m in MlflowClient().get_metric_history(run_id, "lr")}
    assert history[3] == 0.003
    assert "lr: 0.0001 -> 0.003" in MlflowClient().get_run(run_id).data.tags["config_change_at_step_2"]


def test_restart_on_config_change_sets_the_old_run_aside_and_starts_at_step_zero(work, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    old = {p.name: p.read_bytes() for p in (out / "checkpoints" / step(out, 2).name).iterdir()}
    old_final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert main(train_args(work, out, "--max-steps", "3", "--lr", "0.003", "--restart-on-config-change")) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.0001 -> 0.003" in printed and "starting at step 0" in printed, printed
    (aside,) = (out / "superseded").iterdir()  # nothing deleted: the old checkpoints and final, byte for byte
    assert {p.name: p.read_bytes() for p in (aside / "checkpoints" / step(out, 2).name).iterdir()} == old
    assert {p.name: p.read_bytes() for p in (aside / "final").iterdir()} == old_final
    assert json.loads((out / "final" / "easyref_config.json").read_text())["extra"]["step"] == 3  # the new run's
    state = json.loads((step(out, 3) / "state.json").read_text())
    old_state = json.loads((aside / "checkpoints" / step(out, 2).name / "state.json").read_text())
    assert state["settings"]["lr"] == 0.003 and state["mlflow_run_id"] != old_state["mlflow_run_id"]  # a new run
    # the same settings again: resumed, nothing set aside
    assert main(train_args(work, out, "--max-steps", "4", "--lr", "0.003", "--restart-on-config-change")) == 0
    assert "resuming from" in capsys.readouterr().out and len(list((out / "superseded").iterdir())) == 1


def test_a_killed_restarted_run_leaves_no_old_final_behind(work, base_run, tmp_path, monkeypatch, capsys):
    """The new run dies in its first step: OUT/final must not be the old settings' model (it is set aside)."""
    from easyref.train.loop import Trainer

    out = copy_run(base_run, tmp_path / "run")
    old_final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}

    def killed(self, step, batches):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", killed)
    assert main(train_args(work, out, "--max-steps", "3", "--lr", "0.003", "--restart-on-config-change")) == 130
    assert "the old checkpoints and final are set aside in" in capsys.readouterr().out
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step_*"))
    (aside,) = (out / "superseded").iterdir()
    assert {p.name: p.read_bytes() for p in (aside / "final").iterdir()} == old_final


def test_allow_and_restart_on_config_change_exclude_each_other(work, tmp_path, capsys):
    flags = ["--max-steps", "1", "--allow-config-change", "--restart-on-config-change"]
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(work, tmp_path / "run", *flags))
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_checkpoint_records_settings_hash_and_data_fingerprint(base_run):
    state = json.loads((step(base_run, 2) / "state.json").read_text())
    assert state["settings"]["seed"] == 0 and state["settings"]["global_batch"] == 2
    assert len(state["data_fingerprint"]) == 16 and state["data_fingerprint"] == state["settings"]["data"]
    sums = (step(base_run, 2) / "checksums.sha256").read_text().splitlines()
    names = {line.split("  ", 1)[1] for line in sums}
    assert names == {
        "trainable.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "state.json",
        "rng_rank0.safetensors",
    }


# -- damaged checkpoints ----------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(path: Path) -> None:
    record = json.loads(path.read_text())
    record["step"] = 5
    path.write_text(json.dumps(record))


def _edit_optimizer(path: Path) -> None:
    record = json.loads(path.read_text())
    record["param_groups"][0]["lr"] = 0.5
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("trainable.safetensors", _truncate),
        ("optimizer.safetensors", _truncate),
        ("state.json", _edit_state),
        ("optimizer.json", _edit_optimizer),
    ],
    ids=["truncated-weights", "truncated-optimizer", "tampered-state", "tampered-optimizer-json"],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
    work, base_run, tmp_path, capsys, name, damage
):
    from easyref.train.config import load_train_config
    from easyref.train.loop import train

    out = copy_run(base_run, tmp_path / "run")
    damage(step(out, 2) / name)
    result = train(load_train_config(work / "params.yaml", "pretrain", {"max_steps": 3}), out=out)
    assert result.start_step == 1 and result.step == 3  # resumed from step 1, not the damaged step 2
    err = capsys.readouterr().err
    assert f"checkpoint {step(out, 2)} is damaged ({name} does not match its recorded SHA-256" in err
    assert (out / "checkpoints" / "damaged_step_00000002" / name).is_file()  # kept for inspection, not deleted
    optimizer = json.loads((step(out, 3) / "optimizer.json").read_text())
    assert optimizer["param_groups"][0]["lr"] == 1e-4


def test_no_intact_checkpoint_is_a_clear_error_not_a_crash(work, tmp_path, capsys):
    out = tmp_path / "single"
    assert main(train_args(work, out, "--max-steps", "1", "--keep-last", "1")) == 0
    _truncate(step(out, 1) / "trainable.safetensors")
    capsys.readouterr()
    assert main(train_args(work, out, "--max-steps", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "no intact checkpoint to resume from (step_00000001: trainable.safetensors does not match" in err
    assert len(message_lines(err)) == 1 and step(out, 1).is_dir()  # nothing moved or deleted


def test_keep_last_one_keeps_the_previous_checkpoint_until_the_new_one_verifies(work, tmp_path, monkeypatch, capsys):
    """Fault injection: the disk loses the tail of step 2's weights after they were checksummed."""
    from easyref import atomic

    real = atomic.write_checksums

    def write_then_lose_data(folder: Path) -> None:
        real(folder)
        if folder.name == ".step_00000002.tmp":
            _truncate(folder / "trainable.safetensors")

    monkeypatch.setattr(atomic, "write_checksums", write_then_lose_data)
    out = tmp_path / "keep1"
    assert main(train_args(work, out, "--max-steps", "2", "--keep-last", "1")) == 0
    err = capsys.readouterr().err
    assert "fails verification (trainable.safetensors does not match" in err and "step_00000001, is intact" in err
    # step 1 survives; step 2, read back damaged, never took a step_* name (and its temp folder is gone)
    assert step(out, 1).is_dir() and not step(out, 2).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    load_file(step(out, 1) / "trainable.safetensors")


# -- damaged --init ---------------------------------------------------------------------------------------------


def test_truncated_init_exits_2_with_one_line_naming_the_file(work, base_run, tmp_path, capsys):
    init = copy_run(base_run / "final", tmp_path / "init")
    _truncate(init / "easyref.safetensors")
    args = ["train", "--stage", "single_ref", "--params", str(work / "params.yaml"), "--init", str(init)]
    assert main([*args, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(message_lines(err)) == 1 and f"{init / 'easyref.safetensors'}: cannot be read as safetensors" in err
    assert not (tmp_path / "never").exists()
    (init / "easyref_config.json").write_text("[1, 2]")
    assert main([*args, "--out", str(tmp_path / "never")]) == 2
    assert "easyref_config.json: expected a JSON object" in capsys.readouterr().err


def test_two_set_asides_within_one_second_get_distinct_names(tmp_path):
    from easyref.train.resume import set_aside_name

    names = []
    for _ in range(3):  # faster than the clock's second: without a suffix the 2nd rename would hit the 1st folder
        names.append(set_aside_name(tmp_path / "superseded"))
        names[-1].mkdir()
    assert len(set(names)) == 3 and all(n.parent == tmp_path / "superseded" for n in names)
