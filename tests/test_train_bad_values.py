"""Training refuses values that cannot train (one line, exit 2, naming the value) and never saves weights that an
update made NaN or infinite. Tiny models on CPU; docs/reliability.md, "Training and generation"."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from easyref.cli import main
from tests.test_adversarial_train import step, train_args, work  # noqa: F401 - `work` is a fixture
from tests.train_fixtures import message_lines


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--lr", "nan"), "lr must be a finite number > 0 (and at most 3.403e+38, the largest float32), got nan"),
        (("--lr", "inf"), "lr must be a finite number > 0 (and at most 3.403e+38, the largest float32), got inf"),
        (("--lr", "1e39"), "lr must be a finite number > 0 (and at most 3.403e+38, the largest float32), got 1e+39"),
        (("--lr=-1e-4",), "got -0.0001"),
        (("--num-workers", "-1"), "num_workers must be >= 0 (0 = load in the training process), got -1"),
        (("--seed", "-1"), "seed must be between 0 and 9223372036854775807, got -1"),
        (("--seed", str(2**64)), f"got {2**64}"),
        (("--noise-offset=-0.1",), "noise_offset must be a finite number >= 0, got -0.1"),
    ],
    ids=["lr-nan", "lr-inf", "lr-1e39", "lr-negative", "num-workers--1", "seed--1", "seed-2**64", "noise-offset--0.1"],
)
def test_values_that_cannot_train_exit_2_with_one_line_naming_the_value(work, tmp_path, capsys, flags, message):  # noqa: F811
    out = tmp_path / "out"
    assert main(train_args(work, out, "--max-steps", "1", *flags)) == 2
    err = capsys.readouterr().err
    (line,) = message_lines(err)
    assert message in line and "Traceback" not in err
    assert not out.exists()  # refused before the lock folder or anything else is written


def test_an_update_that_makes_weights_non_finite_stops_before_they_are_saved(work, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Fault injection standing for an update that overflows (what `--lr inf` did: a finite loss, then every
    trainable weight NaN): step 2's update leaves one weight NaN. The run stops at once with one line naming the
    step and the tensor; step 1's checkpoint is the last thing written, and no final/ holds the NaN weights."""
    real = torch.optim.AdamW.step
    calls = []

    def step_then_overflow(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_overflow)
    out = tmp_path / "diverged"
    assert main(train_args(work, out, "--max-steps", "3", "--save-every", "1")) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in message_lines(err) if "error" in x]  # besides tqdm's progress bar
    assert line.startswith("easyref train: error: step 2's update") and "Traceback" not in err, err
    assert "step 2's update made 1 trainable weight tensor(s) NaN or infinite (" in line, err
    assert f"stopped without saving them. Last good checkpoint: {step(out, 1)}" in line
    assert len(calls) == 2 and not (out / "final").exists() and not step(out, 2).exists()
    weights = load_file(step(out, 1) / "trainable.safetensors")
    assert all(t.isfinite().all() for t in weights.values())


def test_the_weight_check_finds_nan_and_inf_in_any_dtype_and_passes_huge_finite_values():
    """Max-abs per tensor: a huge finite weight is no false alarm (a norm would overflow), an empty shard is fine."""
    from easyref.train.distributed import DistEnv, nonfinite

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    named = [
        ("huge", torch.full((4, 4), 3e38)),
        ("empty_shard", torch.empty(0)),
        ("bf16_inf", torch.tensor([1.0, math.inf], dtype=torch.bfloat16)),
        ("nan", torch.tensor([[0.0, math.nan]])),
        ("fine", torch.zeros(3, requires_grad=True)),
    ]
    assert nonfinite(named, env) == ["bf16_inf", "nan"]
    assert nonfinite([], env) == []
