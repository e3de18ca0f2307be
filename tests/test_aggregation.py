"""Aggregation variants (model.aggregation): tokens (the paper's), mean and concat of per-image encodings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easyref.model import EasyRef, ModelConfig, ReferenceProcessor, common_length, load_model, read_checkpoint_config
from tests.conftest import SMALL_PIXELS, make_group

NUM_TOKENS = 4


def _build(tiny_models, aggregation: str) -> tuple[EasyRef, ReferenceProcessor]:
    config = ModelConfig(num_tokens=NUM_TOKENS, aggregation=aggregation, **SMALL_PIXELS)
    torch.manual_seed(0)
    model = EasyRef.from_base(tiny_models / "sdxl", tiny_models / "mllm", config)
    return model, ReferenceProcessor.from_pretrained(tiny_models / "mllm", config)


def test_unknown_aggregation_is_rejected():
    with pytest.raises(ValueError, match="aggregation must be one of tokens, mean, concat"):
        ModelConfig(aggregation="sum")


def test_per_image_aggregations_give_one_mllm_turn_per_image(tiny_models):
    _, processor = _build(tiny_models, "mean")
    inputs = processor([make_group(1, 3), None], ["a cat", ""])
    assert inputs["input_ids"].shape[0] == 4 and inputs["group_sizes"].tolist() == [3, 1]
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(dim=1)
    assert (image_tokens > 0).all()  # every turn holds exactly one image
    assert "group_sizes" not in _build(tiny_models, "tokens")[1]([make_group(1, 3)], ["a cat"])


@pytest.mark.parametrize("aggregation", ["mean", "concat"])
def test_group_state_is_the_mean_or_concatenation_of_single_image_states(tiny_models, aggregation):
    model, processor = _build(tiny_models, aggregation)
    a, b = make_group(3, 2)
    with torch.no_grad():
        group = model.encode_references(processor([[a, b]], ["a shape"]))
        single = [model.encode_references(processor([[im]], ["a shape"])) for im in (a, b)]
    expected = (single[0] + single[1]) / 2 if aggregation == "mean" else torch.cat(single, dim=1)
    tokens = NUM_TOKENS if aggregation == "mean" else 2 * NUM_TOKENS
    assert group.shape == (1, tokens, model.reference_encoder.hidden_size)
    torch.testing.assert_close(group, expected, atol=1e-5, rtol=1e-4)


def test_common_length_tiles_token_sets_without_changing_attention():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 5, 8, generator=g)
    short, long = torch.randn(1, 4, 8, generator=g), torch.randn(1, 6, 8, generator=g)
    tiled_short, tiled_long = common_length([short, long])
    assert tiled_short.shape == tiled_long.shape == (1, 12, 8)  # lcm(4, 6)
    for original, tiled in ((short, tiled_short), (long, tiled_long)):
        torch.testing.assert_close(
            F.scaled_dot_product_attention(query, original, original),
            F.scaled_dot_product_attention(query, tiled, tiled),
        )


@pytest.mark.parametrize("aggregation", ["mean", "concat"])
def test_each_variant_trains_a_step_generates_and_is_recorded_by_its_checkpoint(tiny_models, tmp_path, aggregation):
    from easyref.base_models import BaseModels
    from easyref.sampler import EasyRefSampler
    from easyref.train.recipe import Conditioner, DiffusionObjective, step_generator

    model, processor = _build(tiny_models, aggregation)
    sampler = EasyRefSampler(model, BaseModels.load(tiny_models / "sdxl", tiny_models / "mllm", model.config))
    conditioner = Conditioner(sampler.base, (0.0, 0.0, 0.0), processor)
    params = model.set_trainable(["reference", "adapter"])
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = {  # groups of different sizes in one batch
        "caption": ["shape 1", "shape 2"],
        "references": [make_group(1, 1), make_group(2, 3)],
        "target": torch.rand(2, 3, 32, 32) * 2 - 1,
    }
    before = model.reference_encoder.ref_tokens.detach().clone()
    loss = DiffusionObjective(model)(conditioner(batch, step_generator(0, 0, 0, 0)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.reference_encoder.ref_tokens)

    with torch.no_grad():  # classifier-free guidance: the one-image unconditional group beside 1 and 3 images
        images = sampler(
            ["shape 1", "shape 2"], batch["references"], num_inference_steps=2, guidance_scale=5.0, generator=0
        )
    assert len(images) == 2 and images[0].size[0] > 0

    saved = model.save_checkpoint(tmp_path / "ckpt", ["reference", "adapter"], stage="test")
    assert read_checkpoint_config(saved).model.aggregation == aggregation
    loaded = load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=saved)
    assert loaded.reference_encoder.aggregation == aggregation
