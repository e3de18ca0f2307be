"""easyref compare: several evaluations in one table in the paper's layout, beside the published figures."""

from __future__ import annotations

import json
from pathlib import Path

from easyref.cli import main


def write_evaluation(folder: Path, split: str, aggregation: str, methods: dict[str, float]) -> Path:
    """An `easyref evaluate` output folder: metrics.json + evaluation.json (only what compare reads)."""
    folder.mkdir(parents=True)
    metrics: dict[str, float] = {"num_samples": 4.0}
    for method, value in methods.items():
        for i, name in enumerate(("clip_i", "clip_t", "dino_i")):
            metrics[f"{method}.{name}"] = value + i / 100
            metrics[f"{method}.{name}.ci_low"] = value + i / 100 - 0.05
            metrics[f"{method}.{name}.ci_high"] = value + i / 100 + 0.05
    metrics["no_colour/easyref.clip_i"] = 0.1  # caption-subset sections are not rows of the paper's table
    info = {
        "split": f"data/split/{split}.parquet",
        "model.aggregation": aggregation,
        "model.num_tokens": 16,
        "model.insertion_layer": -1,
        **{f"seconds_per_group.{m}": 2.0 for m in methods},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "evaluation.json").write_text(json.dumps(info))
    return folder


def test_compare_prints_sections_variants_and_the_labelled_published_column(tmp_path, capsys):
    baselines = {"text": 0.3, "ip_adapter": 0.4}
    tokens = write_evaluation(tmp_path / "tokens", "held_out", "tokens", {"easyref": 0.5, **baselines})
    mean = write_evaluation(tmp_path / "mean", "held_out", "mean", {"easyref": 0.45, **baselines})
    held_in = write_evaluation(tmp_path / "in", "held_in", "tokens", {"easyref": 0.6, "lora": 0.55, **baselines})
    assert (
        main(
            ["compare", str(tokens), f"ablation={mean / 'metrics.json'}", str(held_in), "--out", str(tmp_path / "t.md")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text().strip() == out.strip()
    lines = out.splitlines()
    assert "published (paper), not ours" in lines[0]
    held_in_at, held_out_at = lines.index("| **held-in** | | | | | |"), lines.index("| **held-out** | | | | | |")
    assert held_in_at < held_out_at  # Table 3 order, whatever the argument order
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "**" not in line}
    tokens_row = next(r for label, r in rows.items() if "aggregation=tokens" in label and lines.index(r) > held_out_at)
    assert "0.500 [0.450, 0.550] | 0.510 [0.460, 0.560] | 0.520 [0.470, 0.570] | 2.0 | .833 / .709 / .614" in tokens_row
    assert rows["EasyRef ablation (aggregation=mean, tokens=16, layer=-1)"].endswith(".818 / .688 / .584 |")
    assert rows["Per-group LoRA"].endswith(".831 / .715 / .654 |")
    # the same baseline figures on the same split appear once per section
    assert (
        sum("IP-Adapter-SDXL" in line for line in lines) == 2 and sum("SDXL, text only" in line for line in lines) == 2
    )
    assert "0.100" not in out


def test_compare_reads_an_mlflow_run_of_easyref_evaluate(tmp_path, capsys):
    from mlflow import MlflowClient

    folder = write_evaluation(tmp_path / "ev", "held_out", "concat", {"easyref": 0.5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("easyref-evaluate", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    for name in ("metrics.json", "evaluation.json"):
        client.log_artifact(run.info.run_id, str(folder / name))
    client.set_terminated(run.info.run_id)
    assert main(["compare", run.info.run_id, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "aggregation=concat" in out and ".821 / .692 / .579" in out


def test_compare_errors_name_the_argument(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "missing: neither an evaluation folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/metrics.json").write_text("{}")
    (tmp_path / "bad/evaluation.json").write_text("{}")
    assert main(["compare", str(tmp_path / "bad")]) == 2
    assert "no easyref.clip_i" in capsys.readouterr().err
