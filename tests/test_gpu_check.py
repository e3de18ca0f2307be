"""benchmarks/gpu_check.py runs end to end on CPU at the tiny size, so its first GPU run is not its first run."""

from __future__ import annotations

from pathlib import Path

from bench_helpers import run_benchmark


def test_gpu_check_runs_on_cpu_at_tiny_size(tmp_path: Path):
    args = ["--device", "cpu", "--profile", "tiny", "--resolution", "64", "--batch", "1", "--steps", "2"]
    report, _ = run_benchmark("gpu_check.py", [*args, "--repeats", "1"], tmp_path / "gpu_check.json")
    assert set(report["training"]) == {"pretrain", "single_ref"}
    for stage in report["training"].values():
        assert stage["step_s"] > 0 and stage["plan_gb"] > 0 and stage["plan_tflops_per_step"] > 0
    # stage 2 trains the whole MLLM and a LoRA on top of stage 1's parts
    assert report["training"]["single_ref"]["trainable_params"] > report["training"]["pretrain"]["trainable_params"]
    sampling = report["sampling"]
    assert sampling["easyref_s_per_image"] > 0 and sampling["ip_adapter_s_per_image"] > 0
    assert sampling["ratio"] == sampling["easyref_s_per_image"] / sampling["ip_adapter_s_per_image"]
