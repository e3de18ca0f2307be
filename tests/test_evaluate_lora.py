"""The per-group LoRA baseline on 2 samples of 2 groups: tuned per group, seeded, removed after each group."""

from __future__ import annotations

import numpy as np
import pytest

from easyref.evaluate.config import EvaluateConfig, LoraBaselineConfig
from easyref.evaluate.samples import ImageStore, load_split
from tests.test_evaluate import write_split


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory):
    from easyref.base_models import BaseModels
    from easyref.evaluate.baselines.lora import LoraBaseline

    samples = load_split(write_split(tmp_path_factory.mktemp("lora"), groups=2, refs=2))
    config = EvaluateConfig(steps=2, lora_baseline=LoraBaselineConfig(steps=3, learning_rate=1e-2))
    baseline = LoraBaseline(BaseModels.load(tiny_models / "sdxl"))
    store = ImageStore()
    return baseline, samples, store, config, baseline(samples, store, config)


def test_lora_baseline_tunes_each_group_and_generates_its_samples(lora_run):
    baseline, samples, store, config, images = lora_run
    assert len(samples) == 2 and len(images) == 2
    assert set(baseline.tuning_seconds) == {"group-0", "group-1"}
    assert not getattr(baseline.pipe.unet, "peft_config", None)  # each group's LoRA is removed after it
    # without the LoRA the same pipeline and seeds give other images: the tuning changed the generation
    plain = baseline.pipe(
        prompt=[s.caption for s in samples], num_inference_steps=2, generator=_generators(samples)
    ).images
    for tuned, untuned in zip(images, plain, strict=True):
        assert np.abs(np.asarray(tuned, dtype=np.int16) - np.asarray(untuned, dtype=np.int16)).max() > 0


def test_lora_baseline_is_seeded(lora_run):
    baseline, samples, store, config, images = lora_run
    again = baseline(samples, store, config)
    for first, second in zip(images, again, strict=True):
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_lora_tuning_lowers_the_loss_on_the_group(lora_run):
    baseline, samples, store, config, _ = lora_run
    import dataclasses

    from easyref.evaluate.baselines.lora import ADAPTER

    longer = dataclasses.replace(config, lora_baseline=dataclasses.replace(config.lora_baseline, steps=12))
    losses = baseline.tune(samples[0], store, longer)
    baseline.pipe.unet.delete_adapters(ADAPTER)
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])


def test_lora_tuning_draws_offset_noise_when_asked(lora_run):
    """`evaluate.lora_baseline.noise_offset` reaches the tuning steps: the same seeds give other losses with it."""
    baseline, samples, store, config, _ = lora_run
    import dataclasses

    from easyref.evaluate.baselines.lora import ADAPTER

    losses = {}
    for offset in (0.0, 0.3, 0.3):
        tuning = dataclasses.replace(config.lora_baseline, steps=2, noise_offset=offset)
        with_offset = dataclasses.replace(config, lora_baseline=tuning)
        losses.setdefault(offset, []).append(baseline.tune(samples[0], store, with_offset))
        baseline.pipe.unet.delete_adapters(ADAPTER)
    assert losses[0.3][0] == losses[0.3][1] and losses[0.3][0] != losses[0.0][0]


def test_the_demo_tunes_the_lora_baseline_with_the_training_offset_noise():
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert params["evaluate"]["lora_baseline"]["noise_offset"] == params["train"]["noise_offset"] > 0
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="noise_offset must be a finite number >= 0"):
            LoraBaselineConfig(noise_offset=bad)


def _generators(samples):
    from easyref.evaluate.generation import seeded_generators

    return seeded_generators(samples)
