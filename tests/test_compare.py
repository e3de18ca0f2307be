"""easyref compare: several evaluations in one table in the paper's layout, beside the published figures."""

from __future__ import annotations

import json
from pathlib import Path

from components.testing import mlflow_store
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


def columns(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


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
    head = columns(lines[0])
    # Table 3's layout: held-in, then held-out as column groups, whatever the argument order
    assert head[1:8] == [
        *(f"held-in {m}" for m in ("CLIP-I", "CLIP-T", "DINO-I")),
        *(f"held-out {m}" for m in ("CLIP-I", "CLIP-T", "DINO-I")),
        "s / group",
    ]
    assert head[8:] == [f"published (paper), not ours: {s} CLIP-I / CLIP-T / DINO-I" for s in ("held-in", "held-out")]
    rows = {columns(line)[0]: columns(line) for line in lines[2:] if line.startswith("| ")}
    # the held-in and held-out evaluations of the same variant fill one row
    tokens_row = rows["EasyRef (aggregation=tokens, tokens=16, layer=-1)"]
    assert tokens_row[1:] == [
        "0.600 [0.550, 0.650]", "0.610 [0.560, 0.660]", "0.620 [0.570, 0.670]",
        "0.500 [0.450, 0.550]", "0.510 [0.460, 0.560]", "0.520 [0.470, 0.570]",
        "2.0", ".843 / .726 / .672", ".833 / .709 / .614",
    ]  # fmt: skip
    mean_row = rows["EasyRef ablation (aggregation=mean, tokens=16, layer=-1)"]
    assert mean_row[1:4] == ["–"] * 3 and mean_row[-2:] == ["–", ".818 / .688 / .584"]
    assert rows["Per-group LoRA"][-2] == ".831 / .715 / .654" and rows["Per-group LoRA"][4:7] == ["–"] * 3
    # the same baseline figures from several evaluations: one row, both sections filled
    assert sum("IP-Adapter-SDXL" in line for line in lines) == 1 and sum("text only" in line for line in lines) == 1
    assert rows["IP-Adapter-SDXL (mean)"][1] == rows["IP-Adapter-SDXL (mean)"][4] == "0.400 [0.350, 0.450]"
    assert list(rows)[:2] == [
        "EasyRef (aggregation=tokens, tokens=16, layer=-1)",
        "EasyRef ablation (aggregation=mean, tokens=16, layer=-1)",
    ]
    assert "0.100" not in out


def write_sectioned(folder: Path, sections: dict[str, dict[str, float]], **info: object) -> Path:
    """An evaluation of several sets in one run: section-prefixed keys, the primary (held-out) also unprefixed."""
    folder.mkdir(parents=True)
    metrics: dict[str, float] = {}
    record: dict[str, object] = {"sections": ", ".join(sections), "primary_section": "held_out", **info}
    for section, methods in sections.items():
        for method, value in methods.items():
            for i, name in enumerate(("clip_i", "clip_t", "dino_i")):
                for suffix, delta in (("", 0.0), (".ci_low", -0.05), (".ci_high", 0.05)):
                    metrics[f"{section}/{method}.{name}{suffix}"] = value + i / 100 + delta
            record[f"{section}/seconds_per_group.{method}"] = 1.0 if section == "held_in" else 3.0
        record[f"{section}/num_groups"] = 2
    metrics.update({k.partition("/")[2]: v for k, v in metrics.items() if k.startswith("held_out/")})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "evaluation.json").write_text(json.dumps(record))
    return folder


def test_compare_reads_both_sections_of_one_evaluation(tmp_path, capsys):
    """One `easyref evaluate --split data/split` run fills the held-in and held-out columns of its rows."""
    both = write_sectioned(
        tmp_path / "both",
        {"held_in": {"easyref": 0.7, "text": 0.3}, "held_out": {"easyref": 0.6, "text": 0.2}},
        **{"model.aggregation": "tokens", "model.num_tokens": 16, "checkpoint_sha256": "a" * 64},
    )
    other_text = write_evaluation(tmp_path / "other", "held_out", "concat", {"easyref": 0.5, "text": 0.25})
    assert main(["compare", str(both), str(other_text)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {columns(line)[0]: columns(line) for line in lines[2:] if line.startswith("| ")}
    easyref = rows["EasyRef (aggregation=tokens, tokens=16, layer=-1)"]
    assert easyref[1] == "0.700 [0.650, 0.750]" and easyref[4] == "0.600 [0.550, 0.650]"
    assert easyref[7] == "2.0"  # 1.0 s on 2 held-in groups and 3.0 s on 2 held-out groups
    assert rows["SDXL, text only"][1] == "0.300 [0.250, 0.350]" and rows["SDXL, text only"][4].startswith("0.200")
    # another evaluation's different figures for the same baseline and section: a row of its own, named
    assert rows["SDXL, text only [other]"][4].startswith("0.250") and rows["SDXL, text only [other]"][1] == "–"


def test_compare_reads_an_mlflow_run_of_easyref_evaluate(tmp_path, capsys):
    from mlflow import MlflowClient

    folder = write_evaluation(tmp_path / "ev", "held_out", "concat", {"easyref": 0.5})
    uri = mlflow_store(tmp_path / "mlflow.db")
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


def markdown_cells(line: str) -> list[str]:
    """The cells of a Markdown table row as GitHub reads them: ``\\|`` is a literal bar, ``\\\\`` a backslash."""
    cells, cell, chars = [], "", iter(line.strip()[1:])
    for char in chars:
        if char == "\\":
            cell += next(chars)
        elif char == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return cells


def test_run_names_with_bars_newlines_and_backslashes_stay_in_their_cells(tmp_path, capsys):
    a = write_evaluation(tmp_path / "a", "held_out", "tokens", {"easyref": 0.5})
    b = write_evaluation(tmp_path / "b", "held_out", "mean", {"easyref": 0.4})
    c = write_evaluation(tmp_path / "c", "held_out", "concat", {"easyref": 0.3})
    names = ["x | y", "two\nlines", "back\\|slash"]
    args = [f"{names[0]}={a}", f"{names[1]}={b}", f"{names[2]}={c}", "--out", str(tmp_path / "t.md")]
    assert main(["compare", *args]) == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    table = lines[: lines.index("")]
    width = len(markdown_cells(table[0]))
    assert len(table) == 2 + 3 and all(len(markdown_cells(line)) == width for line in table), table
    labels = [markdown_cells(line)[0] for line in table[2:]]
    assert labels == [
        "EasyRef x | y (aggregation=tokens, tokens=16, layer=-1)",
        "EasyRef two lines (aggregation=mean, tokens=16, layer=-1)",
        "EasyRef back\\|slash (aggregation=concat, tokens=16, layer=-1)",
    ]


def test_an_out_under_a_file_is_one_line_before_anything_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    evaluation = write_evaluation(tmp_path / "ev", "held_out", "tokens", {"easyref": 0.5})
    assert main(["compare", str(evaluation), "--out", str(tmp_path / "file" / "x.md")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"--out {tmp_path / 'file' / 'x.md'}: cannot create its folder" in captured.err
    assert main(["compare", str(evaluation), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_a_run_id_on_an_unreachable_tracking_server_fails_fast_naming_it(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://user:secret@127.0.0.1:{port}"
    command = [sys.executable, "-m", "easyref.cli", "compare", "0" * 32, "--tracking-uri", uri]
    # MLflow's own retries take about four minutes here; a hang fails the test at the timeout
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "\n" not in err and f"tracking server http://127.0.0.1:{port} does not answer" in err
    assert "secret" not in err
