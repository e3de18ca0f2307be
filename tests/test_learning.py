"""EasyRef training makes the model use its references, and the gate knows when it does not.

A short stage 1 on the demo data (pretrained tiny base, the demo's split) is evaluated on the held-out groups: the
reference gain's 95% interval lies above zero. The same run with the references removed (every group replaced by
the black "no reference" image) shows no such gain, and the promotion gate of params.yaml refuses it. This is the
short version of ``benchmarks/bench_learning.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150
SAMPLES = 16


def _bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_training_learns_to_use_references_and_the_gate_blocks_a_model_without(tmp_path):
    bench = _bench()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"]["steps"] = 10  # generation is not what this test is about; the gain needs no sampling
    bench.prepare(tmp_path, params)
    with_refs = bench.train_and_evaluate(tmp_path, params, "refs", STEPS, True, SAMPLES)
    without = bench.train_and_evaluate(tmp_path, params, "norefs", STEPS, False, SAMPLES)

    assert with_refs["easyref.reference_gain.ci_low"] > 0, with_refs["easyref.reference_gain"]
    assert without["easyref.reference_gain.ci_low"] <= 0 < without["easyref.reference_gain.ci_high"] or abs(
        without["easyref.reference_gain"]
    ) < with_refs["easyref.reference_gain"] / 4
    passed, lines = bench.gate(with_refs, params)
    assert passed, lines
    passed, lines = bench.gate(without, params)
    assert not passed, lines
