"""The evaluation as the paper's Table 3 in kind: paired differences with a bootstrap over groups, the ordering
said in words, the gate's paired rule, the compact headline file DVC shows, and evaluate/config.py as a leaf.

Per-sample tables here are synthetic (what `easyref evaluate` scores, with chosen values), so each figure is known.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from easyref.evaluate.config import METRICS, SWAPPED, TEXT, EvaluateConfig, known_baselines
from easyref.evaluate.paired import ordering_verdict, paired_summaries
from easyref.evaluate.scoring import flat_metrics, summarize
from easyref.evaluate.sections import combine
from easyref.stats import bootstrap_over_groups, mean_ci

ROOT = Path(__file__).resolve().parents[1]
GROUPS, PER_GROUP = 8, 3


def per_sample_table(offsets: dict[str, float], seed: int = 0, gain: float = 0.01) -> pd.DataFrame:
    """One row per (method, sample) as `score` writes it: each method's metrics are a shared per-sample base (group
    effect + sample noise) plus the method's offset and a little noise of its own; EasyRef has a reference gain."""
    rng = np.random.default_rng(seed)
    samples = [(f"g{g}", f"g{g}/s{i}") for g in range(GROUPS) for i in range(PER_GROUP)]
    group_effect = {f"g{g}": rng.normal(0, 0.05) for g in range(GROUPS)}
    base = {sid: 0.6 + group_effect[g] + rng.normal(0, 0.02) for g, sid in samples}
    rows = []
    for method, offset in offsets.items():
        for group, sid in samples:
            row = {"method": method, "sample_id": sid, "group": group, "caption": f"a {group}", "seed": 0}
            row.update({m: base[sid] + offset + rng.normal(0, 0.002) for m in METRICS})
            if method == "easyref":
                row.update(loss_own=0.03, loss_other=0.03 + gain + rng.normal(0, 0.001))
                row["reference_gain"] = row["loss_other"] - row["loss_own"]
            rows.append(row)
    return pd.DataFrame(rows)


def same_scores(table: pd.DataFrame, method: str, like: str) -> pd.DataFrame:
    """``table`` with ``method``'s per-sample scores replaced by ``like``'s (its images score exactly as those)."""
    source = table[table.method == like].set_index("sample_id")
    rows = table.method == method
    table = table.copy()
    for metric in METRICS:
        table.loc[rows, metric] = source.loc[table.loc[rows, "sample_id"], metric].to_numpy()
    return table


def section_summary(table: pd.DataFrame) -> dict:
    """What `evaluate` keeps per section: the methods' summaries and the paired comparisons."""
    return {**summarize(table, 0.95), **paired_summaries(table, 0.95)}


def held_out_metrics(table: pd.DataFrame) -> dict[str, float | None]:
    """metrics.json of an evaluation whose only section is held-out (so its keys are also unprefixed)."""
    return combine({"held_out": flat_metrics(section_summary(table), table["sample_id"].nunique())}, "held_out")


PAPER_ORDER = {"easyref": 0.05, SWAPPED: 0.0, TEXT: 0.0, "ip_adapter": 0.02}


def test_bootstrap_resamples_groups_so_correlated_samples_do_not_narrow_the_interval():
    # 4 groups of 50 identical values: 200 samples, but only 4 independent draws
    values = [v for v in (1.0, -1.0, 0.5, -0.3) for _ in range(50)]
    groups = [g for g in "abcd" for _ in range(50)]
    by_group = bootstrap_over_groups(values, groups, seed=1)
    by_sample = mean_ci(values)
    assert by_group.mean == pytest.approx(sum(values) / len(values)) and by_group.count == 200
    assert by_group.low < by_group.mean < by_group.high
    assert by_group.half_width > 5 * by_sample.half_width  # the t-interval over samples would claim far more
    assert bootstrap_over_groups(values, groups, seed=1) == by_group  # same seed, same interval


def test_bootstrap_edge_cases():
    zeros = bootstrap_over_groups([0.0] * 6, list("aabbcc"))
    assert (zeros.mean, zeros.low, zeros.high) == (0.0, 0.0, 0.0)
    one_group = bootstrap_over_groups([0.1, 0.2], ["a", "a"])
    assert one_group.mean == pytest.approx(0.15) and math.isnan(one_group.low)
    assert bootstrap_over_groups([1.0, math.nan, 3.0], ["a", "b", "c"]).count == 2
    assert math.isnan(bootstrap_over_groups([], []).mean)
    with pytest.raises(ValueError, match="3 values but 2 group labels"):
        bootstrap_over_groups([1.0, 2.0, 3.0], ["a", "b"])


def test_paired_differences_are_easyref_minus_each_baseline_on_the_same_samples():
    table = per_sample_table(PAPER_ORDER)
    paired = paired_summaries(table, 0.95)
    assert set(paired) == {
        "paired/easyref_vs_easyref_swapped",
        "paired/easyref_vs_text",
        "paired/easyref_vs_ip_adapter",
        "paired/ip_adapter_vs_text",
    }
    easyref = table[table.method == "easyref"].set_index("sample_id")
    text = table[table.method == TEXT].set_index("sample_id")
    diff = paired["paired/easyref_vs_text"]["clip_i"]
    assert diff.mean == pytest.approx((easyref["clip_i"] - text["clip_i"]).mean())
    assert diff.count == GROUPS * PER_GROUP and 0 < diff.low < diff.mean < diff.high
    assert diff.mean == pytest.approx(0.05, abs=0.005)
    # the paired interval removes what every method shares (group and sample effects): far narrower than either
    # method's own interval, which is what makes a 0.02 difference visible
    own = summarize(table, 0.95)["easyref"]["clip_i"]
    assert diff.half_width < own.half_width / 5
    flat = flat_metrics(section_summary(table), GROUPS * PER_GROUP)
    assert flat["paired/easyref_vs_text.clip_i.ci_low"] == pytest.approx(diff.low, abs=1e-6)


def test_the_report_says_whether_the_papers_ordering_holds():
    holds = ordering_verdict(section_summary(per_sample_table(PAPER_ORDER)))
    assert holds.holds is True
    assert holds.sentence.startswith("On held-out groups the paper's ordering EasyRef > IP-Adapter > text-only holds")
    assert len(holds.details) == 2 and all("(above 0)" in line for line in holds.details)

    # IP-Adapter no better than text-only: the second step fails, on both metrics, and the sentence says which
    broken = ordering_verdict(section_summary(same_scores(per_sample_table(PAPER_ORDER), "ip_adapter", TEXT)))
    assert broken.holds is False and "does not hold" in broken.sentence
    assert "CLIP-I IP-Adapter - text-only" in broken.sentence and "DINO-I IP-Adapter - text-only" in broken.sentence
    assert "EasyRef - IP-Adapter" not in broken.sentence

    missing = ordering_verdict(section_summary(per_sample_table({"easyref": 0.05, TEXT: 0.0})))
    assert missing.holds is None and "cannot be checked: IP-Adapter not evaluated" in missing.sentence


def test_gate_refuses_a_model_whose_images_equal_text_only_even_with_a_reference_gain():
    """params.yaml's gate: reference gain above 0 AND EasyRef's held-out CLIP-I above text-only's (paired)."""
    from easyref.config import load_section
    from easyref.registry import RegisterConfig, evaluate_gate

    gate = load_section(RegisterConfig, ROOT / "params.yaml", "register").gate
    assert any(r.metric == "paired/easyref_vs_text.clip_i.ci_low" and r.min == 0.0 for r in gate)
    assert any(r.metric == "easyref.reference_gain.ci_low" and r.min == 0.0 for r in gate)

    good = held_out_metrics(per_sample_table(PAPER_ORDER))
    lines = evaluate_gate({k: v for k, v in good.items() if v is not None}, None, gate)
    assert all(line.passed for line in lines), [line.describe() for line in lines]

    # EasyRef's images are text-only's (the reference path does nothing to them): same per-sample scores
    same = held_out_metrics(same_scores(per_sample_table(PAPER_ORDER), "easyref", TEXT))
    assert same["easyref.reference_gain.ci_low"] > 0 and same["paired/easyref_vs_text.clip_i.ci_low"] == 0.0
    lines = evaluate_gate({k: v for k, v in same.items() if v is not None}, None, gate)
    failed = [line.describe() for line in lines if not line.passed]
    assert failed == ["paired/easyref_vs_text.clip_i.ci_low: 0.0000 must be > 0.0000 -> FAIL"]


def test_report_has_table_3_the_paired_rows_and_the_verdict_beside_swapped_and_colour():
    import html

    from easyref.evaluate.report import ReportSection, render_report

    sections = [
        ReportSection(name, title, section_summary(per_sample_table(PAPER_ORDER, seed=i)), [], {})
        for i, (name, title) in enumerate([("held_in", "held-in (seen)"), ("held_out", "held-out (unseen)")])
    ]
    page = html.unescape(render_report(sections, {"primary_section": "held_out"}, 0.95))
    assert "Table 3 in kind" in page and page.index("held-in (seen)") < page.index("held-out (unseen)")
    assert "On held-out groups the paper's ordering EasyRef > IP-Adapter > text-only holds" in page
    for row in (
        "EasyRef (checkpoint) - SDXL, text only",
        "EasyRef (checkpoint) - IP-Adapter-SDXL (mean)",
        "EasyRef (checkpoint) - EasyRef, another group's references",
        "IP-Adapter-SDXL (mean) - SDXL, text only",
        "bootstrap interval over groups",
    ):
        assert row in page
    table3 = page[page.index("Table 3 in kind") : page.index('id="held_in"')]
    labels = ("SDXL, text only", "IP-Adapter-SDXL (mean)", "EasyRef (checkpoint)")
    positions = [table3.index(f"<td>{label}</td>") for label in labels]
    assert positions == sorted(positions)  # the paper's row order: text-only, IP-Adapter, EasyRef
    # the per-section tables keep the swapped-reference row and the Colour column, and show no paired key
    section = page[page.index('id="held_out"') :]
    assert "EasyRef, another group's references" in section and "<th>Colour</th>" in section
    assert "paired/" not in page


def test_headline_file_is_what_dvc_metrics_show_prints(tmp_path):
    """metrics.json keeps every statistic; headline.json (the evaluate stage's DVC metrics) a few columns."""
    from components.testing import tool_env
    from easyref.evaluate.outputs import HEADLINE_FILE, headline
    from tests.test_dvc import dvc

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert stage["metrics"] == [f"outputs/eval/{HEADLINE_FILE}"]
    assert "outputs/eval/metrics.json" in stage["outs"]  # still an output: register reads it

    table = per_sample_table({**PAPER_ORDER, "lora": 0.01})
    flat = {name: flat_metrics(section_summary(table), 24) for name in ("held_in", "held_out")}
    full = combine(flat, "held_out")
    compact = headline(full, ["held_in", "held_out"])
    assert list(compact["held_out"]) == [TEXT, "ip_adapter", "lora", "easyref"]  # Table 3's rows, in its order
    assert compact["held_out"]["easyref"]["clip_i"] == full["held_out/easyref.clip_i"]
    assert compact["held_in"]["easyref"]["reference_gain"] == full["held_in/easyref.reference_gain"]
    assert set(compact["held_out"][TEXT]) == {"clip_i", "clip_t", "dino_i"}

    repo = tmp_path / "repo"
    (repo / "outputs/eval").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = tool_env(tmp_path)
    dvc("init", "-q", cwd=repo, env=env)
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"evaluate": {"cmd": "true", "metrics": stage["metrics"]}}})
    )
    (repo / "outputs/eval/metrics.json").write_text(json.dumps(full))
    (repo / "outputs/eval" / HEADLINE_FILE).write_text(json.dumps(compact))
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo, env=env))
    (files,) = [data["data"] for data in shown.values()]
    columns = files[f"outputs/eval/{HEADLINE_FILE}"]["data"]
    assert columns["held_out"]["easyref"]["clip_i"] == full["held_out/easyref.clip_i"]
    leaves = sum(len(m) for s in columns.values() for m in s.values())
    assert leaves == 2 * (4 * 3 + 1) and len(full) > 10 * leaves  # 26 columns instead of the full table's hundreds


def test_evaluate_config_is_a_leaf_that_imports_no_torch_and_scans_no_plugin():
    code = (
        "import sys, easyref.evaluate.config as c\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'diffusers', 'transformers', 'pandas') if m in sys.modules)\n"
        "plugins = sorted(m for m in sys.modules if m.startswith('easyref.evaluate.baselines'))\n"
        "c.EvaluateConfig(baselines=['text', 'ip_adapter', 'lora'])\n"
        "after = sorted(m for m in sys.modules if m.startswith('easyref.evaluate.baselines'))\n"
        "print(heavy, plugins, after)\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[] [] []"  # validating the baselines lists their files, imports none
    # config.py imports nothing of the project (so nothing can run back up into it)
    source = (ROOT / "src/easyref/evaluate/config.py").read_text()
    assert "from easyref" not in source and "import easyref" not in source
    assert known_baselines() == (TEXT, "ip_adapter", "lora")
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['nope'\]; choose from text, ip_adapter, lora"):
        EvaluateConfig(baselines=["nope"])
