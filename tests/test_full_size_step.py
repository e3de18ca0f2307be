"""benchmarks/full_size_step.py at a tiny size: the code path of the full-size CPU step (random bf16 models, the
trainer's build_optimizer and train_step, stage 2 with LoRA and gradient checkpointing, the plan comparison)."""

from __future__ import annotations

import math
from pathlib import Path

from bench_helpers import run_benchmark

from easyref.architectures import mllm_config


def test_full_size_step_runs_at_tiny_size(tiny_models: Path, tmp_path: Path):
    tree = str(tiny_models)
    args = ["--profile", tree, "--tiny", tree, "--resolution", "64", "--threads", "1"]
    report, stdout = run_benchmark("full_size_step.py", args, tmp_path / "step.json")
    pretrain, single = report["stages"]["pretrain"], report["stages"]["single_ref"]
    assert math.isfinite(pretrain["loss"]) and math.isfinite(single["loss"])

    # the CPU build in bf16 has exactly the parameters the plan counts on the meta device, part by part
    assert report["params"] == single["plan"]["params"] and report["params_match_plan"] is True
    assert pretrain["trainable"] == sum(pretrain["plan"]["trainable"].values())
    assert single["trainable"] == sum(single["plan"]["trainable"].values())
    assert single["trainable"] > pretrain["trainable"]

    # stage 1: AdamW stepped every trainable tensor; stage 2: every trainable part got gradients
    assert pretrain["optimizer_stepped_fraction"] == 1.0
    assert single["gradients"] == {p: 1.0 for p in ("lora", "ip_kv", "projector", "mllm_head", "mllm_trunk")}

    # the structure that ran: insertion at the last decoder layer, the config's M-RoPE sections, every IP layer
    text = mllm_config(tiny_models).text_config
    s = report["structure"]
    assert (s["trunk_layers"], s["head_layers"]) == (text.num_hidden_layers - 1, 1)
    assert s["mrope_section"] == text.rope_parameters["mrope_section"]
    assert s["ip_layers"] == single["plan"]["ip_layers"] > 0 and s["lora_layers"] > 0
    assert s["context_tokens"] == single["plan"]["context_tokens"] == pretrain["plan"]["context_tokens"]
    assert s["visual_tokens"] == 2 * (report["reference_side"] // 28) ** 2

    # memory: a peak per stage, set against the plan's estimate for the same settings
    assert report["memory"]["baseline_rss_gb"] > 0 and report["tolerance"] > 0
    for stage in (pretrain, single):
        assert stage["peak_rss_gb"] >= report["memory"]["baseline_rss_gb"]
        assert stage["measured_over_plan"] == stage["above_baseline_gb"] / stage["plan"]["total_gb"]
    assert pretrain["plan"]["terms_gb"]["optimizer"] > 0 and single["plan"]["terms_gb"]["optimizer"] == 0
    assert single["frozen_released"] and single["plan"]["terms_gb"]["frozen_vae_text"] == 0
    assert "pretrain" in stdout and "single_ref" in stdout
