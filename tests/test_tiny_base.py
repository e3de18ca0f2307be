"""The tiny profile's pretrained SDXL base: shipped as it was made, a latent space of unit scale, a VAE that
reconstructs, and a UNet that draws the colour a caption names (what a real EasyRef's base can already do)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from easyref.tiny.assets import MANIFEST, file_checksums
from easyref.tiny.base import ASSET, BasePretrainConfig, fingerprint, load_pairs, pretrain_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo data of the demo's own seed (the base was pretrained on another seed's images)."""
    from easyref.data.demo import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, seed=0, min_images=3, max_images=3)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_packaged_base_is_what_its_manifest_says_and_the_defaults_make():
    manifest = json.loads((ASSET / MANIFEST).read_text())
    assert file_checksums(ASSET) == manifest["files"]  # no file changed since `easyref pretrain-base` wrote it
    assert manifest["config"] == {k: v for k, v in vars(BasePretrainConfig()).items()}  # the documented command
    # and this code made it: an edit to the base's training, the tiny SDXL or the demo data asks for a re-made base
    assert manifest["code_sha256"] == fingerprint()


def test_tiny_models_start_from_the_pretrained_base(tiny_models):
    for part in ("vae", "unet", "text_encoder", "text_encoder_2"):
        shipped = (ASSET / part / "diffusion_pytorch_model.safetensors")
        if not shipped.exists():
            shipped = ASSET / part / "model.safetensors"
        written = tiny_models / "sdxl" / part / shipped.name
        assert written.read_bytes() == shipped.read_bytes(), part


def test_text_encoders_are_the_tiny_clips_frozen_text_towers():
    """As SDXL's are CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers: the packaged base's two encoders hold
    the judge CLIP's and the IP-Adapter CLIP's trained towers, unchanged by the UNet's training (so a re-trained
    CLIP asks for a re-made base)."""
    from safetensors.torch import load_file

    from easyref.tiny.assets import asset

    for name, part, projected in (("text_encoder", "clip", False), ("text_encoder_2", "ip_clip", True)):
        encoder = load_file(ASSET / name / "model.safetensors")
        clip = load_file(asset(part) / "model.safetensors")
        tower = {k.removeprefix("text_model."): v for k, v in clip.items() if k.startswith("text_model.")}
        if projected:
            tower = {f"text_model.{k}": v for k, v in tower.items()} | {"text_projection.weight":
                                                                         clip["text_projection.weight"]}
        assert encoder.keys() == tower.keys(), (name, sorted(encoder.keys() ^ tower.keys())[:4])
        for key, value in encoder.items():
            assert torch.equal(value, tower[key]), (name, key)


def test_scaled_latents_have_unit_std(pipe, demo):
    images, _ = load_pairs(demo, 64)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    assert 0.8 <= float(latents.std()) <= 1.25


def test_vae_reconstructs_the_demo_images(pipe, demo):
    images, _ = load_pairs(demo, 64)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    # the packaged VAE reaches about 0.010 (the previous base's: 0.037; a random one: about 0.5)
    assert float(torch.nn.functional.mse_loss(recon, images)) < 0.02


def test_base_draws_a_subject_on_a_pale_background(pipe):
    """Text to image gives what the demo shows (one saturated subject on a light background), not noise."""
    from easyref.metrics import hue_histogram

    prompts = [f"a large {c} circle in the centre on a white background" for c in ("red", "blue", "green")]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images
    for image in images:
        pixels = np.asarray(image, dtype=np.float32)
        # the four 6x6 corners: a large centred circle reaches the middle of every edge, never a corner
        corners = np.concatenate([pixels[r, c].reshape(-1, 3) for r in (slice(0, 6), slice(-6, None))
                                  for c in (slice(0, 6), slice(-6, None))])
        assert corners.mean() > 180, f"the background is not light: corners' mean {corners.mean():.0f}"
        assert hue_histogram(image).sum() > 0, "no saturated subject"


def test_base_draws_the_colour_and_shape_its_caption_names(pipe):
    """Text to image from captions naming colour and shape (the base's check, one seeded sample per subject) at the
    tiny profile's guidance (params.yaml evaluate.guidance, chosen where this check peaks: docs/training.md): the
    packaged base, trained with offset noise on every colour x shape x pattern, draws 0.92 of them in the named colour
    and the judge names the shape of 0.50 at 3 (at guidance 7.5: 0.77 and 0.48; the judge names 0.85 of drawn images'
    shapes, of their VAE reconstructions 0.77: the most a UNet drawing through this VAE can score); the 48-subject
    base drew 0.65 / 0.35 at 3, one trained on plain noise 0.21 at 7.5, and the same UNet continued on plain noise
    0.125 (chance 0.125): it took the colour from the noise."""
    from easyref.tiny.assets import asset
    from easyref.tiny.base_check import text_to_image_rates

    guidance = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]["guidance"]
    rates = text_to_image_rates(pipe, asset("clip"), guidance=guidance)
    assert rates["colour_rate"] >= 0.8, rates
    assert rates["shape_rate"] >= 0.4, rates  # chance 1/6
    # the VAE blurs edges and loses stripes and dots, so its reconstructions' shapes are named less often than the
    # drawn images' (0.77 against 0.85), yet far above chance and above what the UNet draws
    assert rates["shape_rate"] < rates["vae_judge_shape_rate"] < rates["judge_shape_rate"], rates
    assert rates["vae_judge_shape_rate"] >= 0.6, rates
    assert sum(rate >= 0.5 for rate in rates["colour_rate_per_colour"].values()) >= 7, rates


@pytest.mark.slow
def test_pretrain_base_resumed_after_its_first_runs_gives_the_bytes_of_one_run(tmp_path):
    """A second UNet run made with --resume-from on the base that the first runs wrote must be the same bytes as the
    whole command run from scratch (docs/training.md resumes the packaged base so); and so the run is reproducible."""
    config = BasePretrainConfig(per_subject=1, vae_steps=2, unet_steps=3, vae_batch=2, unet_batch=2,
                                unet_restart_steps=3)
    whole = pretrain_base(tmp_path / "whole", config)
    first = pretrain_base(tmp_path / "first", dataclasses.replace(config, unet_restart_steps=0))
    resumed = pretrain_base(tmp_path / "resumed", config, resume=tmp_path / "first")
    assert whole["files"] == resumed["files"]
    assert whole["scaling_factor"] == resumed["scaling_factor"]
    assert first["files"]["unet/diffusion_pytorch_model.safetensors"] != whole["files"][
        "unet/diffusion_pytorch_model.safetensors"]  # the second run did train
    assert resumed["first_runs_resumed_from"]["unet"] == first["files"]["unet/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize(("earlier", "named"), [({"unet_restart_steps": 4000}, "already had its second UNet run"),
                                                ({"per_subject": 8}, "per_subject")])
def test_resume_refuses_a_base_made_otherwise(tmp_path, earlier, named):
    from easyref.errors import UserError
    from easyref.tiny.assets import MANIFEST
    from easyref.tiny.base import load_first_run

    config = BasePretrainConfig()
    first_runs = {**dataclasses.asdict(config), "unet_restart_steps": 0}
    manifest = {"config": {**first_runs, **earlier}, "text_encoders_from": {}, "files": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=named):
        load_first_run(None, tmp_path, config, {})


def test_resume_refuses_a_base_whose_files_changed(tmp_path):
    from easyref.errors import UserError
    from easyref.tiny.assets import MANIFEST
    from easyref.tiny.base import load_first_run

    config = BasePretrainConfig()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"edited")
    manifest = {"config": {**dataclasses.asdict(config), "unet_restart_steps": 0}, "text_encoders_from": {},
                "files": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="differ from their checksums"):
        load_first_run(None, tmp_path, config, {})


def test_base_check_sees_the_trained_vae_keep_colours_a_random_one_loses(tiny_models, tmp_path):
    """The base's check (`python -m easyref.tiny.base_check`, numbers in docs/training.md) measures every colour
    and tells the packaged VAE from a random one of the same architecture: the packaged one keeps each colour
    within 65 (its worst, yellow, 61, and blue 43: checkers averaged; the 48-subject base's worst was blue, 57, and
    the first base's 118), a random one moves them by about 150 on average (blue and teal by 240)."""
    from diffusers import AutoencoderKL

    from easyref.tiny.base_check import vae_colour_error
    from easyref.tiny.build import write_sdxl

    torch.set_num_threads(1)
    trained = vae_colour_error(AutoencoderKL.from_pretrained(tiny_models / "sdxl" / "vae"))
    random = vae_colour_error(AutoencoderKL.from_pretrained(write_sdxl(tmp_path / "random", seed=0) / "vae"))
    assert len(trained) == 8 and trained.keys() == random.keys()
    assert sum(trained.values()) < 0.6 * sum(random.values()), (trained, random)
    assert max(trained.values()) <= 65, trained


def test_base_check_command_names_a_missing_model_folder(tmp_path, capsys):
    from easyref.tiny.base_check import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "no model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--guidance", "-1"], ["--guidance", "nan"], ["--seeds", "0"]])
def test_base_check_command_refuses_impossible_settings(flag, capsys):
    from easyref.tiny.base_check import main

    with pytest.raises(SystemExit) as exit_info:
        main(flag)
    assert exit_info.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_min_snr_weight_lowers_only_the_nearly_clean_timesteps():
    """Min-SNR-5 (``pretrain-base --snr-gamma 5``): weight 1 where SNR <= 5 (the noisy timesteps that decide an
    image's layout), 5 / SNR above it; gamma 0 is plain MSE."""
    from diffusers import DDPMScheduler

    from easyref.tiny.base_train import min_snr_weight

    alphas = DDPMScheduler(beta_schedule="scaled_linear").alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = min_snr_weight(alphas, 5.0)
    assert torch.equal(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))
    assert torch.allclose(weights[snr > 5], 5 / snr[snr > 5])
    assert 0 < float(weights.min()) < 0.01 and int((snr > 5).sum()) > 50  # t = 0 has SNR ~1000
    assert torch.equal(min_snr_weight(alphas, 0.0), torch.ones_like(alphas))


def test_weight_average_starts_at_the_first_step_and_warms_up_its_decay():
    """``pretrain-base --ema-decay``: the average is the first step's weights, then moves toward each step's weights
    by ``1 - min(decay, (1 + n) / (10 + n))`` at step n: fast at first, by ``1 - decay`` once warmed up."""
    from easyref.tiny.base_train import update_average

    weights = torch.tensor([1.0])
    average = update_average(None, [weights], 0.2, 1)
    assert average[0] is not weights and float(average[0]) == 1.0  # a copy of the first step's weights
    for n, value in ((2, 5.0), (3, 9.0), (4, 9.0)):  # decay min(0.2, 3/12) = 0.2 from step 2 on
        weights.fill_(value)
        average = update_average(average, [weights], 0.2, n)
    assert abs(float(average[0]) - 8.808) < 1e-5  # 1 -> 4.2 -> 8.04 -> 8.808
    # a high decay is warmed up: at step 2 the average still moves 3/4 of the way (decay min(0.999, 3/12))
    start = update_average(None, [torch.tensor([1.0])], 0.999, 1)
    assert abs(float(update_average(start, [torch.tensor([5.0])], 0.999, 2)[0]) - 4.0) < 1e-6


@pytest.mark.parametrize(("flag", "message"), [(["--unet-restart-steps", "-1"], "--unet-restart-steps must be >= 0"),
                                               (["--vae-steps", "0"], "--vae-steps must be >= 1")])
def test_pretrain_base_command_refuses_impossible_settings(flag, message, capsys):
    from easyref.cli import main

    assert main(["pretrain-base", *flag]) == 2
    assert message in capsys.readouterr().err


def test_pretrain_base_resume_from_a_folder_without_a_manifest_says_so(tmp_path, capsys):
    from easyref.cli import main

    out = tmp_path / "out"
    assert main(["pretrain-base", "--resume-from", str(tmp_path), "--out", str(out), "--unet-steps", "1",
                 "--vae-steps", "1", "--per-subject", "1"]) == 2
    assert "pretrain.json missing" in capsys.readouterr().err
    assert not out.exists()
