"""One set of base models (``BaseModels``): loaded once, then shared by the trainer's steps, the sampler of its
previews and the evaluator's baselines; the trainer runs as named steps."""

from __future__ import annotations

import collections
import math

import pytest

from tests.conftest import SMALL_PIXELS
from tests.train_fixtures import write_groups


@pytest.fixture()
def loads(monkeypatch) -> collections.Counter:
    """How often each base part is read from disk while the test runs (by class name)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    counts: collections.Counter = collections.Counter()
    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel):

        def counted(*args, _load=cls.from_pretrained, _name=cls.__name__, **kw):
            counts[_name] += 1
            return _load(*args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", counted)
    return counts


ONCE = {"AutoencoderKL": 1, "CLIPTextModel": 1, "CLIPTextModelWithProjection": 1}


def test_trainer_steps_run_on_one_base_loaded_once(tmp_path, tiny_models, loads):
    from easyref.model import ModelConfig
    from easyref.sampler import EasyRefSampler
    from easyref.train import distributed as D
    from easyref.train.config import TrainConfig
    from easyref.train.loop import Trainer

    data = write_groups(tmp_path / "groups")
    config = TrainConfig(
        base=str(tiny_models), data=str(data), resolution=32, batch_size=2, max_steps=2, save_every=2,
        preview_every=-1, model=ModelConfig(num_tokens=8, **SMALL_PIXELS),
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "out", None, D.setup())
    trainer.build()
    assert loads == ONCE | {"UNet2DConditionModel": 1}  # the UNet is EasyRef's own
    assert trainer.conditioner.base is trainer.base
    preview = EasyRefSampler(trainer.model, trainer.base)  # what the previewer samples with: nothing loaded again
    assert preview.pipe.vae is trainer.base.vae and preview.pipe.text_encoder_2 is trainer.base.text_encoder_2
    assert preview.pipe.unet is trainer.model.unet and preview.processor is trainer.base.processor
    assert loads == ONCE | {"UNet2DConditionModel": 1}
    batches = trainer.batches()
    losses = [trainer.train_step(step, batches) for step in range(config.max_steps)]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    trainer.save(2, losses[-1])
    assert (tmp_path / "out" / "checkpoints" / "step_00000002" / "state.json").is_file()


def test_baselines_reuse_the_evaluators_base(tiny_models, loads):
    """The IP-Adapter and LoRA baselines each load only their own UNet (was: the whole SDXL pipeline each)."""
    from easyref.base_models import BaseModels
    from easyref.evaluate.baselines import load_baseline
    from easyref.evaluate.command import with_base_defaults
    from easyref.evaluate.config import EvaluateConfig

    base = BaseModels.load(tiny_models / "sdxl", tiny_models / "mllm")
    config = with_base_defaults(EvaluateConfig(), tiny_models)
    baselines = [load_baseline(name, base, config) for name in ("ip_adapter", "lora")]
    assert loads == ONCE | {"UNet2DConditionModel": 2}
    for baseline in baselines:
        assert baseline.pipe.vae is base.vae and baseline.pipe.text_encoder is base.text_encoder
        assert baseline.pipe.unet is not baselines[0].pipe.unet or baseline is baselines[0]
