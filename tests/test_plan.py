"""`easyref plan` and the meta-device architectures: parameter figures, memory arithmetic, FLOPs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easyref.architectures import REAL_CONFIGS, build_easyref, count
from easyref.model import ModelConfig, adapter_processors
from easyref.plan import make_plan
from easyref.plan_measure import _SavedBytes, _sdpa

ROOT = Path(__file__).resolve().parents[1]


def _tiny_plan(tiny_models: Path, **kw):
    args = dict(gpus=2, batch=1, resolution=64, references=1, ref_side=56, num_tokens=8)
    args.update(kw)
    return make_plan(str(tiny_models), **args)


def test_plan_parameters_equal_the_meta_build(tiny_models: Path):
    plan = _tiny_plan(tiny_models, stage="single_ref")
    model = build_easyref(tiny_models, ModelConfig(num_tokens=8, lora_rank=128))
    by_part = {p: count(param for _, param in model.parameters_of([p])) for p in ("reference", "adapter", "lora")}
    assert plan.params["mllm_head"] == by_part["reference"]
    assert plan.params["ip_kv"] + plan.params["projector"] == by_part["adapter"]
    assert plan.params["lora"] == by_part["lora"]
    assert sum(plan.params[p] for p in ("unet", "lora", "ip_kv", "projector", "mllm_head", "mllm_trunk")) == count(
        model.parameters()
    )
    assert plan.ip_layers == len(adapter_processors(model.unet))
    assert plan.trainable["mllm_trunk"] == plan.params["mllm_trunk"]  # stage 2 trains the whole MLLM
    assert plan.trainable["unet"] == 0


def test_fsdp_shards_weights_gradients_and_optimizer(tiny_models: Path):
    ddp = _tiny_plan(tiny_models, stage="pretrain", compare_aggregation=False)
    fsdp = _tiny_plan(tiny_models, stage="pretrain", fsdp=True, compare_aggregation=False)
    for key in ("weights", "gradients", "optimizer"):
        assert fsdp.memory_gb[key] == pytest.approx(ddp.memory_gb[key] / 2)
    assert fsdp.memory_gb["activations"] == ddp.memory_gb["activations"]
    trainable = sum(ddp.trainable.values())
    assert ddp.memory_gb["optimizer"] == pytest.approx(8 * trainable / 1e9)


def test_bf16_weights_halve_the_exact_terms_and_keep_no_weight_copies(tiny_models: Path):
    """``param_dtype=bf16`` (benchmarks/full_size_step.py's CPU run): weights, gradients and AdamW moments in 2 bytes;
    autocast then makes no bf16 copies of the weights, so fewer bytes are saved for backward."""
    fp32 = _tiny_plan(tiny_models, stage="single_ref", compare_aggregation=False)
    bf16 = _tiny_plan(tiny_models, stage="single_ref", compare_aggregation=False, param_dtype=torch.bfloat16)
    assert bf16.params == fp32.params
    for key in ("weights", "frozen_vae_text", "gradients", "optimizer"):
        assert bf16.memory_gb[key] == pytest.approx(fp32.memory_gb[key] / 2)
    assert bf16.memory_gb["activations"] < fp32.memory_gb["activations"]
    longer = _tiny_plan(tiny_models, stage="pretrain", compare_aggregation=False, text_tokens=100)
    assert longer.context_tokens == fp32.context_tokens + 40  # the default assumes 60 text tokens


def test_checkpointing_trades_activations_for_flops_and_aggregation_saves(tiny_models: Path):
    plain = _tiny_plan(tiny_models, stage="pretrain", batch=2)
    ckpt = _tiny_plan(tiny_models, stage="pretrain", batch=2, gradient_checkpointing=True, compare_aggregation=False)
    assert ckpt.memory_gb["activations"] < plain.memory_gb["activations"]
    assert ckpt.tflops_per_sample["unet"] > plain.tflops_per_sample["unet"]
    # stage 1 runs the trunk without gradients: its FLOPs are forward only, and cheaper than training it all
    assert plain.aggregation is not None and plain.aggregation["ratio"] > 1.5
    assert all(v > 0 for v in plain.tflops_per_sample.values())


def test_attention_is_accounted_as_a_fused_kernel():
    """Saved bytes grow linearly with the sequence (no L x L matrix); FLOPs are 4 B H L^2 D forward, 2.5x back."""
    from torch.utils.flop_counter import FlopCounterMode

    b, h, length, d = 1, 4, 1024, 64
    q = torch.randn(b, h, length, d, device="meta", requires_grad=True)
    kv = torch.randn(b, 2, length, d, device="meta", requires_grad=True)  # grouped-query: 2 key/value heads
    saved = _SavedBytes(set())
    with FlopCounterMode(display=False) as fwd, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = _sdpa(q, kv, kv)
    assert out.shape == q.shape
    assert saved.total < 8 * b * h * length * d * 4  # a few (L, D) tensors, far below one L x L matrix
    assert fwd.get_total_flops() == 4 * b * h * length * length * d
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    assert bwd.get_total_flops() == 10 * b * h * length * length * d


def test_bad_input_is_one_line(tmp_path: Path):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    for args, needle in (
        (["--resolution", "100"], "multiple of 64"),
        (["--profile", str(tmp_path)], "not a profile"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "easyref.cli", "plan", "--stage", "pretrain", *args],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "easyref.cli", "plan", "--stage", "pretrain", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution", "65536"], "--resolution must be a multiple of 64 from 64 to 4096, got 65536"),
        (["--references", "1000"], "--references must be between 1 and 32, got 1000"),
        (["--ref-side", "28000"], "--ref-side must be a multiple of 28 from 28 to 1344, got 28000"),
        (["--batch", "100000"], "--batch must be between 1 and 1024, got 100000"),
        (["--gpus", "10000000"], "--gpus must be between 1 and 100000, got 10000000"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_flags_past_their_bounds_exit_2_before_any_tracing(tiny_models: Path, flags, message):
    """`--resolution 65536 --references 1000` traced for minutes; every flag has a maximum, checked first."""
    result = _plan_cli("--profile", str(tiny_models), "--ref-side", "56", *flags)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line


def test_json_output_that_cannot_be_written_exits_2_before_the_plan_is_computed(tiny_models: Path, tmp_path: Path):
    """A folder, a path under a file: refused first (no plan printed), not a traceback after the whole computation."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for target, message in (
        (tmp_path, f"--json {tmp_path} is a folder; give a file name such as {tmp_path / 'plan.json'}"),
        (a_file / "plan.json", f"--json {a_file / 'plan.json'}: {a_file} is not a folder"),
    ):
        result = _plan_cli(
            "--profile", str(tiny_models), "--resolution", "64", "--references", "1", "--json", str(target)
        )
        assert result.returncode == 2 and result.stdout == "", result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert message in line


@pytest.mark.slow
def test_real_profile_matches_the_paper_counts(tmp_path: Path):
    """The real configs, built with the project's classes on meta: IP k/v 340.8M, projector 5.5M, head + tokens
    46.9M, LoRA r128 185.8M, 70 IP layers; and the plan's JSON carries them."""
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "easyref.cli",
            "plan",
            "--profile",
            "real",
            "--stage",
            "single_ref",
            "--gpus",
            "8",
            "--batch",
            "2",
            "--resolution",
            "1024",
            "--fsdp",
            "--gradient-checkpointing",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    millions = {k: round(v / 1e6, 1) for k, v in plan["params"].items()}
    assert millions["ip_kv"] == 340.8
    assert millions["projector"] == 5.5
    assert millions["mllm_head"] == 46.9
    assert millions["lora"] == 185.8
    assert plan["ip_layers"] == 70
    assert round((plan["params"]["mllm_head"] + plan["params"]["mllm_trunk"]) / 1e9, 2) == 2.21  # Qwen2-VL-2B
    assert round(plan["params"]["unet"] / 1e9, 2) == 2.57  # SDXL UNet
    assert plan["fits"]["141 GB"] is True
    assert REAL_CONFIGS.joinpath("sdxl", "unet", "config.json").is_file()


def test_activation_estimate_matches_a_measured_cpu_step(tiny_models: Path):
    """The meta trace (substituted trunk output, fused-attention model, autocast emulation) against the real code
    path on CPU: bytes kept for backward by one stage-1 forward of the tiny model under bf16 autocast. Stated
    tolerance 25%: the trace follows CUDA autocast (norms in fp32), CPU autocast keeps them in bf16."""
    from PIL import Image

    import easyref.plan_measure as pm
    from easyref.model import ReferenceProcessor, load_model

    config = ModelConfig(num_tokens=8, min_pixels=4 * 784, max_pixels=4 * 784, dropped_image_size=56)
    torch.manual_seed(0)
    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=config)
    model.set_trainable(["reference", "adapter"])
    processor = ReferenceProcessor.from_pretrained(tiny_models / "mllm", config)
    batch = 2
    inputs = processor([[Image.new("RGB", (56, 56), (40 * i, 80, 120))] for i in range(batch)], ["a cat"] * batch)
    unet = model.unet
    pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    saved = pm._SavedBytes({p.untyped_storage()._cdata for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        states = model.encode_references(inputs)
        model(
            torch.randn(batch, 4, 8, 8),
            torch.randint(0, 1000, (batch,)),
            torch.randn(batch, 77, unet.config.cross_attention_dim),
            torch.randn(batch, pooled_dim),
            torch.randn(batch, 6),
            states,
        )
    image_tokens = int((inputs["input_ids"][0] == processor.image_token_id).sum())
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    trace = pm.trace_step(
        tiny_models, ["reference", "adapter"], 0, batch, 64, 1, 56, num_tokens=8, text_tokens=text_tokens
    )
    estimate = sum(c.saved_bytes for c in trace.components.values())
    assert trace.context_tokens == inputs["input_ids"].shape[1]
    assert 0.75 * saved.total <= estimate <= 1.25 * saved.total, (estimate, saved.total)


def test_requested_dtype_wins_over_the_dtypes_configs_name(tiny_models: Path):
    """transformers builds a model in the dtype its config names (SDXL's text_encoder_2: float16); a build asked for
    bf16 holds every parameter in bf16, or CPU autocast fails on mixed layer-norm dtypes."""
    from easyref.architectures import build_base

    base = build_base(tiny_models, "meta", torch.bfloat16)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "mllm"):
        assert {p.dtype for p in getattr(base, name).parameters()} == {torch.bfloat16}, name
