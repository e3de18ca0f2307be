"""What the tiny SDXL base can do, measured on held-back images and captions (``python -m easyref.tiny.base_check``),
and its preview picture.

* ``vae_colour_error``: for each of the demo's 8 colours, how far (RGB distance, 0-255 scale) the mean colour of the
  subject's pixels moves through the VAE (encode, decode) on held-back images; 0 = kept exactly. A VAE that
  squeezes the colours into two families (red -> brown, blue/green/purple -> teal) scores 60-120 there.
* ``colour_rate`` / ``shape_rate``: text to image from captions that name the colour and shape ("a large striped
  blue circle in the centre on a white background"), one image per catalogue subject and seed; the share whose
  subject is drawn in the named colour (:func:`easyref.metrics.named_colour`) and the share the pretrained tiny
  CLIP judge, asked to choose among the six shapes, names the right shape. ``judge_shape_rate`` is the same
  judge on held-back *drawn* images of those subjects: the most ``shape_rate`` can be with this judge;
  ``vae_judge_shape_rate`` the same judge on those images' VAE reconstructions: the most a UNet that draws through
  this VAE can score (the VAE blurs edges and loses stripes and dots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECK_CAPTION = "a large {noun} in the centre on a white background"


def reconstruct(vae: Any, images: list[Any], resolution: int) -> tuple[Any, Any]:
    """``images`` resized to ``resolution`` (float RGB pixels, ``(N, R, R, 3)``) and their reconstructions through
    ``vae`` (encode to the posterior mean, decode; ``(N, 3, R, R)`` in [-1, 1])."""
    import numpy as np
    import torch

    pixels = np.stack([np.asarray(im.convert("RGB").resize((resolution, resolution)), np.float32) for im in images])
    with torch.no_grad():
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1
        return pixels, vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)


def vae_colour_error(vae: Any, per_subject: int = 2, resolution: int = 64) -> dict[str, float]:
    """Mean RGB distance between a held-back image's subject colour and its reconstruction's, per colour."""
    import numpy as np

    from easyref.data.demo import COLOURS
    from easyref.tiny.data import CHECK_SEED, draw

    drawn = draw(CHECK_SEED, per_subject)
    pixels, recon = reconstruct(vae, [d.image for d in drawn], resolution)
    recon_pixels = ((recon + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    errors: dict[str, list[float]] = {}
    for original, rebuilt, d in zip(pixels, recon_pixels, drawn, strict=True):
        subject = np.linalg.norm(original - np.asarray(COLOURS[d.subject.colour], np.float32), axis=-1) < 40
        if subject.sum() >= 5:  # the pattern's shade and anti-aliased edges are left out
            errors.setdefault(d.subject.colour, []).append(
                float(np.linalg.norm(rebuilt[subject].mean(0) - original[subject].mean(0))))
    return {colour: round(float(np.mean(errors[colour])), 1) for colour in COLOURS if colour in errors}


def shape_hits(clip: Any, images: list[Any], subjects: list[Any]) -> list[bool]:
    """Whether the CLIP judge, choosing among the six shapes (colour and pattern as the subject's), names each
    image's subject's shape."""
    from easyref.data.demo import SHAPES

    embeddings = clip.embed_images(images)
    hits = []
    for embedding, subject in zip(embeddings, subjects, strict=True):
        options = [f"a {subject.describe().rsplit(' ', 1)[0]} {shape}" for shape in SHAPES]
        hits.append(SHAPES[int((clip.embed_texts(options) @ embedding).argmax())] == subject.shape)
    return hits


def text_to_image_rates(pipe: Any, clip_folder: Path, seeds: int = 1, steps: int = 20,
                        guidance: float = 7.5) -> dict[str, Any]:
    """Share of text-to-image samples in the named colour and shape, overall and per colour."""
    import torch

    from easyref.data.demo import BACKGROUNDS, COLOURS, catalogue
    from easyref.metrics import ClipEmbedder, named_colour
    from easyref.tiny.data import CHECK_SEED, draw

    subjects = catalogue()
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for seed in range(seeds):
        for start in range(0, len(subjects), 16):
            prompts = [CHECK_CAPTION.format(noun=s.describe()) for s in subjects[start:start + 16]]
            images += pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=side, width=side,
                           generator=torch.Generator().manual_seed(seed * 1000 + start)).images
    clip = ClipEmbedder.from_pretrained(str(clip_folder))
    colour_hits = [named_colour(image, COLOURS, list(BACKGROUNDS.values())) == subject.colour
                   for image, subject in zip(images, subjects * seeds, strict=True)]
    per_colour: dict[str, list[bool]] = {c: [] for c in COLOURS}
    for hit, subject in zip(colour_hits, subjects * seeds, strict=True):
        per_colour[subject.colour].append(hit)
    shapes = shape_hits(clip, images, subjects * seeds)
    drawn = draw(CHECK_SEED, 2)
    judge = shape_hits(clip, [d.image for d in drawn], [d.subject for d in drawn])
    rebuilt = pipe.image_processor.postprocess(reconstruct(pipe.vae, [d.image for d in drawn], side)[1])
    through_vae = shape_hits(clip, rebuilt, [d.subject for d in drawn])
    return {
        "colour_rate": round(sum(colour_hits) / len(colour_hits), 3),
        "shape_rate": round(sum(shapes) / len(shapes), 3),
        "judge_shape_rate": round(sum(judge) / len(judge), 3),
        "vae_judge_shape_rate": round(sum(through_vae) / len(through_vae), 3),
        "colour_rate_per_colour": {c: round(sum(v) / len(v), 2) for c, v in per_colour.items()},
    }


def check(sdxl: Path, clip_folder: Path, seeds: int = 1, guidance: float = 7.5) -> dict[str, Any]:
    """The base's check (see the module docstring) at classifier-free guidance ``guidance``."""
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return {"vae_colour_error": vae_colour_error(pipe.vae),
            **text_to_image_rates(pipe, clip_folder, seeds, guidance=guidance)}


PREVIEW_CAPTIONS = (
    "a large red circle in the centre on a white background",
    "a large blue square in the centre on a white background",
    "a large green triangle in the centre on a cream background",
    "a large yellow star in the centre on a light grey background",
    "a large striped purple hexagon in the centre on a white background",
    "a large orange cross in the centre on a pale blue background",
    "a large checkered teal circle in the centre on a white background",
    "a large polka-dot brown square in the centre on a white background",
)


def write_preview(sdxl: Path, png: Path, seed: int = 0) -> None:
    """A picture of what the base can do: held-back images, their VAE reconstructions, text-to-image samples.

    Rows: 8 held-back images (one per colour), their reconstructions, then two seeds of 30-step DDIM samples
    (guidance 7.5) for :data:`PREVIEW_CAPTIONS`, whose captions are written under the grid.
    """
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from PIL import Image, ImageDraw

    from easyref.data.demo import COLOURS
    from easyref.tiny.data import CHECK_SEED, draw

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    drawn = draw(CHECK_SEED, 1)
    picks = [next(d.image for d in drawn if d.subject.colour == colour) for colour in COLOURS]
    pixels, recon = reconstruct(pipe.vae, picks, side)
    rows = [[Image.fromarray(p.astype(np.uint8)) for p in pixels], pipe.image_processor.postprocess(recon)]
    for s in (seed, seed + 1):
        rows.append(pipe(list(PREVIEW_CAPTIONS), num_inference_steps=30, guidance_scale=7.5, height=side,
                         width=side, generator=torch.Generator().manual_seed(s)).images)
    cell, label = side * 2, 14
    labels = ["held-back images", "VAE reconstructions", "text to image, seed 0", "text to image, seed 1"]
    canvas = Image.new("RGB", (8 * cell, len(rows) * (cell + label) + 8 * 12 + 6), "white")
    draw_on = ImageDraw.Draw(canvas)
    for r, (row, text) in enumerate(zip(rows, labels, strict=True)):
        y = r * (cell + label)
        draw_on.text((2, y + 1), text, fill="black")
        for c, im in enumerate(row):
            canvas.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y + label))
    y = len(rows) * (cell + label) + 4
    for i, caption in enumerate(PREVIEW_CAPTIONS):
        draw_on.text((2, y + 12 * i), f"column {i + 1}: {caption}", fill="black")
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)


def main(argv: list[str] | None = None) -> int:
    """``python -m easyref.tiny.base_check [SDXL_FOLDER] [CLIP_FOLDER]``: print the check of a tiny base as JSON
    (default: the tiny models that ``easyref tiny-models`` wrote to ``models/tiny``)."""
    import argparse
    import json

    import torch

    parser = argparse.ArgumentParser(prog="python -m easyref.tiny.base_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdxl", nargs="?", type=Path, default=Path("models/tiny/sdxl"),
                        help="an SDXL pipeline folder (default: models/tiny/sdxl)")
    parser.add_argument("clip", nargs="?", type=Path, default=Path("models/tiny/clip"),
                        help="the CLIP judge's folder (default: models/tiny/clip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="text-to-image samples per catalogue subject (default 1: 48 images; 3 narrows the rates)")
    parser.add_argument("--guidance", type=float, default=7.5,
                        help="classifier-free guidance of the text-to-image samples (default 7.5, as the packaged "
                             "check; the tiny profile's evaluate.guidance was chosen where this check peaks)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1 sample per subject")
    if not 0 <= args.guidance <= 50:
        parser.error(f"--guidance {args.guidance}: give a weight within 0..50")
    for folder, marker in ((args.sdxl, "model_index.json"), (args.clip, "config.json")):
        if not (folder / marker).is_file():
            parser.error(f"{folder}: no {marker}; write the tiny models first (easyref tiny-models --out models/tiny)"
                         " or give the folders")
    torch.set_num_threads(args.threads)
    print(json.dumps(check(args.sdxl, args.clip, args.seeds, args.guidance), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
