"""The MLLM processor runs in the DataLoader's collate function (in worker processes with ``num_workers > 0``):
a prepared batch conditions the model exactly as the same batch processed in the main process did, and worker
processes give the same per-step losses as none."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMALL_PIXELS
from tests.train_fixtures import write_groups

DROPS = (0.3, 0.3, 0.2)  # high drop rates, so a few steps exercise every kind of drop


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return write_groups(tmp_path_factory.mktemp("data") / "groups", groups=3, per_group=3)


def _config(tiny_models, data, **kw):
    from easyref.model import ModelConfig
    from easyref.train.config import TrainConfig

    drop_text, drop_image, drop_both = DROPS
    return TrainConfig(
        base=str(tiny_models), data=str(data), resolution=32, batch_size=3, max_steps=4, save_every=0,
        preview_every=-1, drop_text=drop_text, drop_image=drop_image, drop_both=drop_both,
        model=ModelConfig(num_tokens=8, **SMALL_PIXELS), **kw,
    )  # fmt: skip


def _trainer(tmp_path, tiny_models, data, **kw):
    from easyref.train import distributed as D
    from easyref.train.loop import Trainer

    trainer = Trainer(_config(tiny_models, data, **kw), tmp_path, None, D.setup())
    trainer.build()
    return trainer


def _assert_same(a, b):
    for name in ("noisy_latents", "timesteps", "text_states", "pooled_text", "time_ids", "noise"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.reference_inputs.keys() == b.reference_inputs.keys()
    for key in a.reference_inputs:
        assert torch.equal(a.reference_inputs[key], b.reference_inputs[key]), key


def test_a_prepared_batch_conditions_exactly_as_the_main_process_did(tmp_path, tiny_models, groups):
    from easyref.train.data import EpochIndexed, SampleKey, collate
    from easyref.train.recipe import draw_drops, step_generator

    trainer = _trainer(tmp_path, tiny_models, groups)
    prepare = trainer.conditioner.prepare(seed=7, rank=1)
    dataset = EpochIndexed(trainer.dataset)
    seen_drops = set()
    for step in range(6):
        samples = [dataset[SampleKey(0, (step * 3 + i) % len(trainer.dataset), step, 0)] for i in range(3)]
        prepared = prepare(samples)
        assert "references" not in prepared  # PIL images stay in the worker; only tensors travel
        raw = collate(samples)
        a = trainer.conditioner(prepared, step_generator(7, step, 0, 1))
        b = trainer.conditioner(raw, step_generator(7, step, 0, 1))  # the processor in this process, as before
        _assert_same(a, b)
        text, image = draw_drops(3, *DROPS, step_generator(7, step, 0, 1))
        seen_drops.update(zip(text, image, strict=True))
    assert {(True, False), (False, True), (True, True), (False, False)} <= seen_drops


def test_a_batch_prepared_for_another_micro_step_is_refused(tmp_path, tiny_models, groups):
    from easyref.train.data import EpochIndexed, SampleKey
    from easyref.train.recipe import step_generator

    trainer = _trainer(tmp_path, tiny_models, groups)
    dataset = EpochIndexed(trainer.dataset)
    prepare = trainer.conditioner.prepare(seed=0, rank=0)
    batch = prepare([dataset[SampleKey(0, i, 0, 0)] for i in range(3)])
    step = next(s for s in range(1, 50) if batch["drops"] != _drops_at(s))  # a step whose draw differs
    with pytest.raises(RuntimeError, match="prepared for another micro-step"):
        trainer.conditioner(batch, step_generator(0, step, 0, 0))
    with pytest.raises(ValueError, match="several micro-steps"):
        prepare([dataset[SampleKey(0, 0, 0, 0)], dataset[SampleKey(0, 1, 1, 0)]])


def _drops_at(step):
    from easyref.train.recipe import draw_drops, step_generator

    return draw_drops(3, *DROPS, step_generator(0, step, 0, 0))


def _losses(trainer) -> list[float]:
    batches = trainer.batches()
    return [trainer.train_step(step, batches) for step in range(trainer.config.max_steps)]


def test_worker_processes_give_the_same_losses_as_none(tmp_path, tiny_models, groups, monkeypatch):
    """Same seed, same data: with two DataLoader workers every step's loss equals the in-process run's, bit for bit
    (the workers draw the drops from the same per-micro-step generator), and the main process ran no MLLM
    processing (the worker processes did it)."""
    from easyref.model import ReferenceProcessor

    calls = []  # appended to in this process only: a forked worker appends to its own copy
    original = ReferenceProcessor.__call__
    monkeypatch.setattr(
        ReferenceProcessor, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    in_process = _losses(_trainer(tmp_path / "w0", tiny_models, groups, num_workers=0, grad_accum=2))
    assert len(calls) == 4 * 2
    workers = _losses(_trainer(tmp_path / "w2", tiny_models, groups, num_workers=2, grad_accum=2))
    assert len(calls) == 4 * 2  # none more: the workers processed every micro-batch
    assert workers == in_process
    assert len(set(in_process)) == len(in_process)  # the steps differ from each other: the comparison has teeth
