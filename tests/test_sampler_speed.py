"""The sampler's savings: reference states reused per (group, caption), no MLLM for text-only, opt-in speed options.

No timings here: the ratios are measured by ``benchmarks/bench_sampler_savings.py`` (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyref.model import adapter_processors
from easyref.sampler import EasyRefSampler
from easyref.sampler_speed import SpeedOptions
from tests.conftest import SMALL_PIXELS, make_group

RUN = dict(num_inference_steps=3, output_type="np", progress=False)


def _sampler(tiny_models) -> EasyRefSampler:
    from easyref.model import ModelConfig

    torch.manual_seed(0)
    return EasyRefSampler.from_pretrained(
        tiny_models / "sdxl", tiny_models / "mllm", model_config=ModelConfig(num_tokens=8, **SMALL_PIXELS)
    )


@pytest.fixture(scope="module")
def sampler(tiny_models) -> EasyRefSampler:
    return _sampler(tiny_models)


@pytest.fixture()
def mllm_passes(sampler):
    """How many times the MLLM reference encoder ran (a list, appended to by a forward hook)."""
    calls: list[int] = []
    handle = sampler.model.reference_encoder.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    yield calls
    handle.remove()


def test_reuse_encodes_each_group_and_caption_once_and_gives_the_images_of_recomputation(sampler, mllm_passes):
    prompts = ["a cat on a mat", "a dog"]
    groups = [make_group(1), make_group(2, 5)]
    with sampler.reuse_references():
        first = sampler(prompts, groups, generator=0, **RUN)
        assert len(mllm_passes) == 3  # the two (group, caption) pairs, then the unconditional group
        again = sampler(prompts, [make_group(1), make_group(2, 5)], generator=1, **RUN)  # equal pixels, new objects
        swapped = sampler(prompts, groups[::-1], generator=0, **RUN)
    assert len(mllm_passes) == 5  # only the two swapped pairs were new
    # Recomputation without reuse, each pair encoded on its own (what reuse caches).
    states = [sampler.encode_references([g], [p]) for g, p in zip(groups, prompts, strict=True)]
    uncond = sampler.encode_unconditional()
    for images, seed, order in ((first, 0, [0, 1]), (again, 1, [0, 1])):
        recomputed = sampler(
            prompts,
            reference_states=torch.cat([states[i] for i in order]),
            negative_reference_states=uncond,
            generator=seed,
            **RUN,
        )
        np.testing.assert_array_equal(images, recomputed)
    swapped_states = torch.cat([sampler.encode_references([groups[1 - i]], [p]) for i, p in enumerate(prompts)])
    recomputed = sampler(prompts, reference_states=swapped_states, negative_reference_states=uncond, generator=0, **RUN)
    np.testing.assert_array_equal(swapped, recomputed)
    # Outside the block nothing is kept: every call encodes again.
    before = len(mllm_passes)
    sampler(prompts, groups, generator=0, **RUN)
    assert len(mllm_passes) == before + 2


def test_text_only_runs_no_mllm_and_keeps_the_images(sampler, mllm_passes):
    groups = [make_group(1), make_group(2)]
    prompts = ["a cat on a mat", "a dog"]
    kw = dict(num_images_per_prompt=2, generator=0, scale=0.0, **RUN)
    without_references = sampler(prompts, **kw)
    assert mllm_passes == []
    # With references given the images are the same (and equal diffusers' text-only pipeline: test_sampler.py's
    # scale-0 parity test, which now runs without the MLLM too).
    np.testing.assert_array_equal(sampler(prompts, groups, **kw), without_references)
    assert mllm_passes == []
    # The installed scale counts too (evaluate's text-only baseline sets it per call; a user may set it once).
    sampler.model.set_scale(0.0)
    try:
        passes = len(mllm_passes)
        np.testing.assert_array_equal(sampler(prompts, groups, **{**kw, "scale": None}), without_references)
        assert len(mllm_passes) == passes
    finally:
        sampler.model.set_scale(sampler.model.config.adapter_scale)


def test_fused_self_attention_keeps_the_reference_branch_and_the_images(tiny_models, sampler):
    fused = _sampler(tiny_models).speed_up(SpeedOptions(fuse_qkv=True))
    assert len(adapter_processors(fused.model.unet)) == len(adapter_processors(sampler.model.unet)) > 0
    assert any(hasattr(m, "to_qkv") for m in fused.model.unet.modules())
    groups, prompts = [make_group(1)], ["a cat"]
    a = fused(prompts, groups, generator=0, scale=1.0, **RUN)
    np.testing.assert_allclose(a, sampler(prompts, groups, generator=0, scale=1.0, **RUN), atol=1e-5)
    b = fused(prompts, [make_group(2)], generator=0, scale=1.0, **RUN)
    assert np.abs(a - b).max() > 1e-3  # the references still act


def test_diffusers_fuse_qkv_projections_would_drop_the_reference_branch(tiny_models):
    unet = _sampler(tiny_models).model.unet
    unet.fuse_qkv_projections()
    assert adapter_processors(unet) == []  # why the sampler fuses only self-attention


def test_fuse_qkv_is_refused_with_a_lora(tiny_models):
    from easyref.errors import UserError

    s = _sampler(tiny_models)
    s.model.add_lora(4)
    with pytest.raises(UserError, match="LoRA"):
        s.speed_up(SpeedOptions(fuse_qkv=True))


def test_channels_last_and_vae_slicing_keep_the_images(tiny_models, sampler):
    fast = _sampler(tiny_models).speed_up(SpeedOptions(channels_last=True, vae_slicing=True))
    groups, prompts = [make_group(1), make_group(2)], ["a cat", "a dog"]
    a = fast(prompts, groups, generator=0, **RUN)
    np.testing.assert_allclose(a, sampler(prompts, groups, generator=0, **RUN), atol=1e-4)


def test_vae_tiling_decodes_large_outputs_close_to_the_whole_decode(tiny_models, sampler):
    tiled = _sampler(tiny_models).speed_up(SpeedOptions(vae_tiling=True))
    latents = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))  # 192 px, tiles of 64
    with torch.no_grad():
        whole = sampler.decode(latents, output_type="np")
        blended = tiled.decode(latents, output_type="np")
    assert blended.shape == whole.shape == (1, 192, 192, 3)
    assert 0 < np.abs(blended - whole).mean() < 0.05  # tiled (seams blended), yet the same picture


def test_generate_text_only_without_references_and_with_speed_flags(tmp_path, tiny_models, capsys):
    from PIL import Image

    from easyref.cli import main

    out = tmp_path / "t.png"
    base = ["generate", "--base", str(tiny_models), "--prompt", "a ball", "--steps", "2", "--out", str(out)]
    assert main(base) == 2
    assert "--scale 0 for text-only" in capsys.readouterr().err
    assert main([*base, "--scale", "0", "--fuse-qkv", "--channels-last", "--vae-slicing", "--vae-tiling"]) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)
