"""One command to check the real scale on one GPU (H100 / H200), in under 8 minutes, without any download.

  python benchmarks/gpu_check.py --out outputs/gpu_check.json

Builds the real architectures (``src/easyref/configs/real``) with random weights directly on the card, as the
trainer holds them (fp32 weights, bf16 autocast), and measures:

1. one optimizer step of each stage at 1024^2 with the per-GPU batch (``--batch``, default 8: the paper's global
   batch 256 on 32 GPUs; the paper states only the global batch): stage 1 trains the reference head + tokens and
   the adapter, stage 2-3 the whole MLLM and a UNet LoRA of rank 128 as well; peak memory (``torch.cuda.max_memory_allocated``) and step time (median of
   ``--repeats`` steps after one warm-up);
2. 30-step 1024^2 sampling with CFG 7.5: ``EasyRefSampler`` (two references through the MLLM, 64 tokens) against
   diffusers' ``StableDiffusionXLPipeline`` with IP-Adapter SDXL (ViT-bigG image encoder, 4 tokens) on the same
   card; seconds per image and their ratio.

Tokenizers are the tiny profile's byte-level ones (the real vocabularies are a download away): token ids differ,
and the MLLM's text part is about 3x longer (one token per byte: ~190 instead of ~60 tokens beside 2 x ~130 visual
tokens), so the MLLM figures are slightly pessimistic. ``--device cpu --profile tiny --resolution 64 --batch 1`` runs the same code in seconds
(tests/test_gpu_check.py does), so the script works the first time it meets a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from easyref.architectures import (  # noqa: E402
    REAL_CONFIGS,
    build_easyref,
    build_image_encoder,
    count,
    profile_model_config,
    random_base_models,
    reference_side,
)

STAGES = {"pretrain": (["reference", "adapter"], 0), "single_ref": (["reference", "adapter", "mllm", "lora"], 128)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", choices=("real", "tiny"), default="real")
    p.add_argument("--batch", type=int, default=8, help="samples per GPU per step (default 8)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--references", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--repeats", type=int, default=2, help="timed training steps per stage after one warm-up")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def references(n: int, seed: int) -> list:
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        im = Image.new("RGB", (400, 360), ((40 * i + seed * 70) % 255, 90, 160))
        ImageDraw.Draw(im).ellipse((40 + 9 * i, 50, 300, 280), fill=(230, 40, 40))
        images.append(im)
    return images


class Setup:
    """Random base models of the profile on the device, with the tiny tree's tokenizers and processors."""

    def __init__(self, args: argparse.Namespace, tiny: Path):
        from diffusers import EulerDiscreteScheduler

        self.device = torch.device(args.device)
        real = args.profile == "real"
        root = REAL_CONFIGS if real else tiny
        self.root = root
        self.config = profile_model_config(real)
        torch.manual_seed(0)
        base, self.shared = random_base_models(root, tiny, self.config, self.device, torch.float32)
        self.base = base
        self.processor = self.shared.processor
        self.pipe = self.shared.pipeline(base.unet, EulerDiscreteScheduler.from_config(base.scheduler_config))
        self.pipe.set_progress_bar_config(disable=True)
        self.noise = self.shared.noise_scheduler


def train_step_fn(setup: Setup, model, optimizer, batch: int, resolution: int, n_refs: int):
    device, pipe = setup.device, setup.pipe
    captions = [f"a red circle number {i}" for i in range(batch)]
    groups = [references(n_refs, i) for i in range(batch)]
    target = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def step() -> float:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            latents = pipe.vae.encode(target).latent_dist.sample() * pipe.vae.config.scaling_factor
            text, _, pooled, _ = pipe.encode_prompt(
                captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        noisy = setup.noise.add_noise(latents, noise, t)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
        inputs = {k: v.to(device) for k, v in setup.processor(groups, captions).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            states = model.encode_references(inputs)
            eps = model(noisy, t, text, pooled, time_ids.to(text.dtype), states)
        loss = torch.nn.functional.mse_loss(eps.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def planned(setup: Setup, stage: str, args: argparse.Namespace) -> dict:
    """What ``easyref plan`` estimates for this stage on one GPU, to set beside the measured figures."""
    from easyref.plan import make_plan

    ref_side = reference_side(setup.config)
    plan = make_plan(
        str(setup.root),
        stage,
        1,
        args.batch,
        args.resolution,
        args.references,
        ref_side,
        gradient_checkpointing=args.gradient_checkpointing,
        compare_aggregation=False,
        num_tokens=setup.config.num_tokens,
    )
    return {"plan_gb": plan.memory_gb["total"], "plan_tflops_per_step": plan.tflops_per_sample["total"] * args.batch}


def check_training(setup: Setup, args: argparse.Namespace) -> tuple[dict, object]:
    from easyref.train.build import enable_gradient_checkpointing

    results = {}
    model = build_easyref(
        setup.root, setup.config, setup.device, torch.float32, unet=setup.base.unet, mllm=setup.base.mllm
    )
    for stage, (parts, rank) in STAGES.items():
        if rank:
            model.add_lora(rank)
            model.to(setup.device)
        params = model.set_trainable(parts)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        reset_peak(setup.device)
        step = train_step_fn(setup, model, optimizer, args.batch, args.resolution, args.references)
        seconds = timed(step, setup.device, args.repeats)
        results[stage] = {
            "trainable_params": count(params),
            "step_s": seconds,
            "samples_per_s": args.batch / seconds,
            "peak_gb": peak_gb(setup.device),
            **planned(setup, stage, args),
        }
        print(f"{stage}: {results[stage]}", flush=True)
        del optimizer
    model.eval()
    return results, model


def ip_adapter_state(unet, image_embed_dim: int, device: torch.device) -> dict:
    """Random IP-Adapter SDXL weights (4 tokens) in the layout ``load_ip_adapter`` reads, sized for ``unet``."""
    cross = unet.config.cross_attention_dim
    proj = {
        "proj.weight": torch.randn(4 * cross, image_embed_dim, device=device) * 0.02,
        "proj.bias": torch.zeros(4 * cross, device=device),
        "norm.weight": torch.ones(cross, device=device),
        "norm.bias": torch.zeros(cross, device=device),
    }
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for p in ("to_k", "to_v"):
                layers[f"{key}.{p}_ip.weight"] = getattr(attn, p).weight.detach().clone()
            key += 2
    return {"image_proj": proj, "ip_adapter": layers}


def check_sampling(setup: Setup, model, args: argparse.Namespace) -> dict:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from easyref.architectures import build_unet
    from easyref.sampler import EasyRefSampler

    size, device = args.resolution, setup.device
    model.to(torch.bfloat16)
    for module in (setup.base.vae, setup.base.text_encoder, setup.base.text_encoder_2):
        module.to(torch.bfloat16)
    sampler = EasyRefSampler(model, setup.shared)
    prompt, refs = "a red circle on a beach", references(args.references, 0)

    def easyref() -> None:
        sampler([prompt], [refs], num_inference_steps=args.steps, height=size, width=size, generator=0, progress=False)

    reset_peak(device)
    ours = timed(easyref, device, 1)
    ours_peak = peak_gb(device)
    root = setup.root
    base_unet: UNet2DConditionModel = build_unet(root, device, torch.bfloat16)
    encoder = build_image_encoder(root, device, torch.bfloat16)
    side = encoder.config.image_size
    pipe = StableDiffusionXLPipeline(
        **{
            **setup.pipe.components,
            "unet": base_unet,
            "image_encoder": encoder,
            "feature_extractor": CLIPImageProcessorPil(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            ),
        }
    )
    pipe.scheduler = sampler.pipe.scheduler  # the same DDIM schedule
    pipe.load_ip_adapter(
        ip_adapter_state(base_unet, encoder.config.projection_dim, device),
        subfolder=None,
        weight_name=None,
        image_encoder_folder=None,
    )
    pipe.to(device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_ip() -> None:
        pipe(
            prompt,
            ip_adapter_image=refs[0],
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(0),
        )

    reset_peak(device)
    theirs = timed(diffusers_ip, device, 1)
    return {
        "easyref_s_per_image": ours,
        "ip_adapter_s_per_image": theirs,
        "ratio": ours / theirs,
        "easyref_peak_gb": ours_peak,
        "ip_adapter_peak_gb": peak_gb(device),
        "steps": args.steps,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    from easyref.tiny_models import write_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_models(Path(tmp) / "tiny")
        setup = Setup(args, tiny)
        device_name = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else "cpu"
        training, model = check_training(setup, args)
        sampling = check_sampling(setup, model, args)
    report = {
        "device": device_name,
        "profile": args.profile,
        "batch": args.batch,
        "resolution": args.resolution,
        "references": args.references,
        "gradient_checkpointing": args.gradient_checkpointing,
        "training": training,
        "sampling": sampling,
        "wall_s": time.perf_counter() - start,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
