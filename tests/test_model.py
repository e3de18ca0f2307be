"""The EasyRef model on the tiny base models: reference encoder, decoupled attention, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from easyref.errors import UserError
from easyref.model import EasyRef, ModelConfig, ReferenceProcessor, adapter_processors, load_model
from tests.conftest import SMALL_PIXELS, make_group


@pytest.fixture()
def model(tiny_models, model_config) -> EasyRef:
    torch.manual_seed(0)
    return EasyRef.from_base(tiny_models / "sdxl", tiny_models / "mllm", model_config)


@pytest.fixture()
def processor(tiny_models, model_config) -> ReferenceProcessor:
    return ReferenceProcessor.from_pretrained(tiny_models / "mllm", model_config)


def _unet_inputs(unet, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.tensor([10, 500])[:batch],
        encoder_hidden_states=torch.randn(batch, 7, cross, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(batch, 1),
        },
    )


def test_processor_expands_one_placeholder_per_merged_visual_token(processor):
    groups = [make_group(1, 3), make_group(2, 1)]
    inputs = processor(groups, ["a cat", "a dog"])
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(dim=1)
    per_image = inputs["image_grid_thw"].prod(-1) // 4
    assert image_tokens.tolist() == [int(per_image[:3].sum()), int(per_image[3])]
    # left padding: every context ends at the last position
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1]
    text = processor.tokenizer.decode(inputs["input_ids"][1][inputs["attention_mask"][1].bool()])
    assert "capturing the essence and details described in this prompt:\na dog" in text


def test_processor_rejects_too_many_references(tiny_models):
    config = ModelConfig(max_references=2, **SMALL_PIXELS)
    processor = ReferenceProcessor.from_pretrained(tiny_models / "mllm", config)
    with pytest.raises(UserError, match="sample 0 has 3 reference images; at most 2"):
        processor([make_group(0, 3)], ["x"])


def test_reference_encoder_shapes_for_groups_of_different_sizes(model, processor, model_config):
    inputs = processor([make_group(1, 1), make_group(2, 4), None], ["a", "bb", ""])
    states = model.encode_references(inputs)
    assert states.shape == (3, model_config.num_tokens, model.reference_encoder.hidden_size)
    assert torch.isfinite(states).all()


def test_gradients_reach_tokens_and_head_but_not_the_frozen_trunk(model, processor):
    model.set_trainable(["reference", "adapter"])
    trunk_outputs = []
    last_trunk_layer = model.reference_encoder.mllm.language_model.layers[-1]
    last_trunk_layer.register_forward_hook(lambda mod, args, out: trunk_outputs.append(out))
    states = model.encode_references(processor([make_group(3, 2)], ["cap"]))
    states.square().mean().backward()
    enc = model.reference_encoder
    assert enc.ref_tokens.grad is not None and enc.ref_tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.head.parameters())
    assert all(p.grad is None for p in enc.mllm.parameters())
    assert trunk_outputs and not trunk_outputs[0].requires_grad  # no graph was built through the trunk


def test_unfrozen_trunk_trains_with_the_whole_mllm(model, processor):
    model.set_trainable(["reference", "adapter", "mllm"])
    model.encode_references(processor([make_group(3, 2)], ["cap"])).sum().backward()
    embed = model.reference_encoder.mllm.language_model.embed_tokens.weight
    assert embed.grad is not None and embed.grad.abs().sum() > 0


@pytest.mark.parametrize("insertion_layer", [-1, -2, -3])
def test_context_hidden_states_equal_a_plain_qwen2vl_forward(tiny_models, insertion_layer):
    from transformers import Qwen2VLForConditionalGeneration

    config = ModelConfig(num_tokens=5, insertion_layer=insertion_layer, **SMALL_PIXELS)
    model = EasyRef.from_base(tiny_models / "sdxl", tiny_models / "mllm", config)
    assert len(model.reference_encoder.head) == -insertion_layer
    processor = ReferenceProcessor.from_pretrained(tiny_models / "mllm", config)
    inputs = processor([make_group(4, 2), make_group(5, 1)], ["one caption", "two"])
    out = model.reference_encoder(inputs, return_context=True)
    plain = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models / "mllm").model(**inputs)
    length = inputs["input_ids"].shape[1]
    assert out.shape[1] == length + 5
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[:, :length][valid], plain.last_hidden_state[valid], atol=1e-5, rtol=1e-5)


def test_reference_tokens_depend_on_the_group(model, processor):
    states = model.encode_references(processor([make_group(1), make_group(2)], ["same", "same"]))
    assert (states[0] - states[1]).abs().max() > 1e-4


def test_ip_projections_start_as_copies_of_text_projections(model):
    procs = adapter_processors(model.unet)
    attn2 = [m for n, m in model.unet.named_modules() if n.endswith("attn2")]
    assert len(procs) == len(attn2) > 0
    for attn in attn2:
        torch.testing.assert_close(attn.processor.to_k_ip[0].weight, attn.to_k.weight, rtol=0, atol=0)
        torch.testing.assert_close(attn.processor.to_v_ip[0].weight, attn.to_v.weight, rtol=0, atol=0)


def test_scale_zero_gives_exactly_the_base_unet(tiny_models, model):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    kwargs = _unet_inputs(base)
    expected = base(**kwargs).sample
    states = torch.randn(2, model.config.num_tokens, model.reference_encoder.hidden_size)
    model.set_scale(0.0)
    got = model.unet(
        **{**kwargs, "added_cond_kwargs": {**kwargs["added_cond_kwargs"], "image_embeds": [states[:, None]]}}
    ).sample
    assert torch.equal(got, expected)
    model.set_scale(1.0)
    got = model.unet(
        **{**kwargs, "added_cond_kwargs": {**kwargs["added_cond_kwargs"], "image_embeds": [states[:, None]]}}
    ).sample
    assert (got - expected).abs().max() > 1e-4


def test_decoupled_attention_matches_ip_adapter_maths(model):
    """out = attn(Q, K_text, V_text) + scale * attn(Q, K_ip, V_ip) on one attn2 layer."""
    attn = next(m for n, m in model.unet.named_modules() if n.endswith("attn2"))
    with torch.no_grad():
        for p in attn.processor.parameters():
            p.normal_(0, 0.2)  # make the reference branch differ from the text branch
    attn.processor.scale = [0.7]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, attn.to_q.in_features, generator=g)
    text = torch.randn(2, 5, attn.to_k.in_features, generator=g)
    ip = torch.randn(2, 1, 4, attn.to_k.in_features, generator=g)
    got = attn(x, encoder_hidden_states=(text, [ip]))

    def heads(t):
        return t.view(2, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(2, -1, t.shape[1] * t.shape[-1])

    q = heads(attn.to_q(x))
    text_out = merge(F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text))))
    ip_flat = ip[:, 0]
    k_ip, v_ip = attn.processor.to_k_ip[0](ip_flat), attn.processor.to_v_ip[0](ip_flat)
    ip_out = merge(F.scaled_dot_product_attention(q, heads(k_ip), heads(v_ip)))
    expected = attn.to_out[1](attn.to_out[0](text_out + 0.7 * ip_out))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _perturb(model: EasyRef, parts, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.parameters_of(parts):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("parts", [["adapter", "reference"], ["adapter", "lora", "mllm", "reference"]])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_models, model, processor, parts):
    if "lora" in parts:
        model.add_lora(4)
    _perturb(model, parts)
    ckpt = model.save_checkpoint(tmp_path / "ckpt", parts, stage="test")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.sha256", "easyref.safetensors", "easyref_config.json"]

    loaded = load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=ckpt)
    inputs = processor([make_group(7, 2)], ["round trip"])
    torch.testing.assert_close(loaded.encode_references(inputs), model.encode_references(inputs), rtol=0, atol=0)
    kwargs = _unet_inputs(model.unet)
    states = torch.randn(2, model.config.num_tokens, model.reference_encoder.hidden_size)
    added = kwargs["added_cond_kwargs"]
    args = (
        kwargs["sample"],
        kwargs["timestep"],
        kwargs["encoder_hidden_states"],
        added["text_embeds"],
        added["time_ids"],
        states,
    )
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)


def test_only_the_trained_parts_are_saved(tmp_path, model):
    from safetensors import safe_open

    ckpt = model.save_checkpoint(tmp_path / "ckpt", ["adapter", "reference"])
    with safe_open(ckpt / "easyref.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "reference_encoder.ref_tokens" in keys
    assert any(".to_k_ip." in k for k in keys) and any(k.startswith("unet.encoder_hid_proj.") for k in keys)
    assert not any(k.startswith("reference_encoder.mllm.") for k in keys)
    assert not any(k.startswith("unet.conv_in") for k in keys)


def test_a_checkpoint_that_fails_its_checksums_is_refused_on_read(tmp_path, tiny_models, model):
    ckpt = model.save_checkpoint(tmp_path / "ckpt", ["adapter", "reference"])
    model.save_checkpoint(ckpt, ["adapter", "reference"], step=2)  # replaced in place: nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    weights = ckpt / "easyref.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"easyref.safetensors does not match its recorded SHA-256") as info:
        load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=ckpt)
    assert "\n" not in str(info.value)


def test_mismatched_checkpoint_names_the_tensors(tmp_path, tiny_models, model):
    ckpt = model.save_checkpoint(tmp_path / "ckpt", ["adapter", "reference"])
    other = ModelConfig(num_tokens=3, **SMALL_PIXELS)  # the checkpoint's own config says 8 tokens
    wrong = EasyRef.from_base(tiny_models / "sdxl", tiny_models / "mllm", other)
    with pytest.raises(
        UserError, match=r"shape mismatch reference_encoder.ref_tokens: checkpoint \(8, 32\), model \(3, 32\)"
    ):
        wrong.load_trained(ckpt)
    with pytest.raises(UserError, match="not an EasyRef checkpoint"):
        load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=tmp_path / "missing")
