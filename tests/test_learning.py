"""EasyRef training makes the model use its references, and the gate knows when it does not.

Stage 1 on the demo data (pretrained tiny parts, the demo's split, one process) is evaluated on the target images
it never trained on (held-out groups and the held-in groups' held-back targets): the reference gain's 95% interval
lies above zero and the promotion gate's reference-gain rule lets it through. A run with the references removed
(every group replaced by the black "no reference" image) is refused by the gate.
``benchmarks/bench_learning.py`` runs the same with the demo's full budget for both.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import yaml

from easyref.metrics import mean_ci

ROOT = Path(__file__).resolve().parents[1]
STEPS = 1000  # what stage 1 needs on the tiny profile to separate the groups (400 steps do not; docs/training.md)
CONTROL_STEPS = 200


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~7 min on a free core; a loaded 2-core machine takes twice that
def test_stage_one_learns_to_use_references_and_the_gate_blocks_a_model_trained_without(tmp_path):
    bench = _bench()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["batch_size"] = 4  # one process here (the demo: two processes of 2)
    params["evaluate"]["steps"] = 2  # the gain needs no sampling; the images are not what this test is about
    # so the gate's rules on generated images (the paired CLIP-I vs text-only) are not applied here: what is
    # checked is the rule on the reference gain, which no model trained without references passes
    params["register"]["gate"] = [r for r in params["register"]["gate"] if "reference_gain" in r["metric"]]
    assert params["register"]["gate"], "params.yaml's gate has no reference-gain rule"
    bench.prepare(tmp_path, params)
    with_refs = bench.train_and_evaluate(tmp_path, params, "refs", STEPS, True, None)
    without = bench.train_and_evaluate(tmp_path, params, "norefs", CONTROL_STEPS, False, None)

    # The gain on every target image stage 1 never trained on: the held-out groups' and the held-in groups' held-back
    # targets. One run's 24 held-out samples alone leave the interval within a group's spread of zero (one of the 8
    # groups scores -1e-3): the pooled 36 decide, and the held-out mean must be positive too.
    bench.easyref("evaluate", "--checkpoint", "runs/refs/final", "--split", "data/split/held_in.parquet", "--base",
                  "models/tiny", "--params", "params_refs.yaml", "--out", "eval/refs_held_in", cwd=tmp_path)
    gains = [
        float(g)
        for folder in ("eval/refs", "eval/refs_held_in")
        for g in pd.read_parquet(tmp_path / folder / "samples.parquet")["reference_gain"].dropna()
    ]
    pooled = mean_ci(gains)
    assert len(gains) >= 30 and pooled.low > 0, pooled
    assert with_refs["easyref.reference_gain"] > 0, with_refs["easyref.reference_gain"]
    pooled_metrics = {**with_refs, "easyref.reference_gain": pooled.mean, "easyref.reference_gain.ci_low": pooled.low,
                      "easyref.reference_gain.ci_high": pooled.high}
    passed, lines = bench.gate(pooled_metrics, params)
    assert passed, lines
    passed, lines = bench.gate(without, params)  # held-out alone, as evaluate reports it
    assert not passed, lines
