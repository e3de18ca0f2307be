"""The DDIM sampler against diffusers' own SDXL pipeline, and the generate command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from easyref.cli import main
from easyref.sampler import EasyRefSampler
from tests.conftest import make_group


@pytest.fixture(scope="module")
def sampler(tiny_models) -> EasyRefSampler:
    from easyref.model import ModelConfig
    from tests.conftest import SMALL_PIXELS

    torch.manual_seed(0)
    return EasyRefSampler.from_pretrained(
        tiny_models / "sdxl", tiny_models / "mllm", model_config=ModelConfig(num_tokens=8, **SMALL_PIXELS)
    )


def _run(sampler, groups, seed=0, **kw):
    prompts = kw.pop("prompts", ["a cat on a mat", "a dog"][: len(groups)])
    return sampler(prompts, groups, generator=seed, num_inference_steps=4, output_type="np", progress=False, **kw)


def test_scale_zero_equals_diffusers_sdxl_pipeline_with_ddim(tiny_models, sampler):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_images_per_prompt=2, negative_prompt="blurry", guidance_scale=7.5, height=64, width=48)
    ours = _run(sampler, [make_group(1), make_group(2, 1)], scale=0.0, **kw)
    theirs = pipe(
        ["a cat on a mat", "a dog"],
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=4,
        output_type="np",
        **kw,
    ).images
    assert ours.shape == (4, 64, 48, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_same_seed_same_images_other_seed_other_images(sampler):
    groups = [make_group(1)]
    a, b, c = _run(sampler, groups, seed=3), _run(sampler, groups, seed=3), _run(sampler, groups, seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_different_reference_groups_give_different_images(sampler):
    a = _run(sampler, [make_group(1)], prompts=["same prompt"], scale=1.0)
    b = _run(sampler, [make_group(2)], prompts=["same prompt"], scale=1.0)
    assert np.abs(a - b).max() > 1e-3


def test_precomputed_group_encoding_is_reused(sampler):
    groups = [make_group(1), make_group(2)]
    prompts = ["x", "y"]
    states = sampler.encode_references(groups, prompts)
    a = sampler(
        prompts,
        reference_states=states,
        negative_reference_states=sampler.encode_unconditional(),
        generator=0,
        num_inference_steps=3,
        output_type="np",
        progress=False,
    )
    b = sampler(prompts, groups, generator=0, num_inference_steps=3, output_type="np", progress=False)
    np.testing.assert_array_equal(a, b)


def test_scale_override_is_restored_after_the_call(sampler):
    from easyref.model import adapter_processors

    _run(sampler, [make_group(1)], scale=0.25)
    assert {tuple(p.scale) for p in adapter_processors(sampler.model.unet)} == {(sampler.model.config.adapter_scale,)}


def test_generate_writes_pngs_from_three_references(tmp_path, tiny_models):
    from PIL import Image

    refs = []
    for i, im in enumerate(make_group(5, 3)):
        refs += ["--ref", str(tmp_path / f"ref{i}.png")]
        im.save(tmp_path / f"ref{i}.png")
    out = tmp_path / "out" / "img.png"
    args = ["generate", "--base", str(tiny_models), *refs, "--prompt", "a ball", "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)
    assert main([*args, "--num-images", "2"]) == 0
    assert (out.parent / "img_0.png").is_file() and (out.parent / "img_1.png").is_file()


def test_generate_reports_missing_and_unreadable_references(tmp_path, tiny_models, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    base = ["generate", "--base", str(tiny_models), "--prompt", "p", "--steps", "1", "--out", str(tmp_path / "o.png")]
    assert main([*base, "--ref", str(tmp_path / "nope.png")]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
    assert main([*base, "--ref", str(bad)]) == 2
    assert "bad.png cannot be read as an image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    make_group(1, 1)[0].save(good)
    assert main(["generate", "--base", str(tmp_path), "--ref", str(good), "--prompt", "p"]) == 2
    assert "easyref tiny-models" in capsys.readouterr().err
