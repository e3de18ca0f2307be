"""Evaluate an EasyRef checkpoint: CLIP-I, CLIP-T, DINO-I, reference gain, and baselines in the same table.

Example (tiny profile):

  easyref evaluate --checkpoint checkpoints/multi --split data/split/held_out.parquet --out outputs/eval \\
      --baseline text --baseline ip_adapter --params params.yaml

Test samples come from a split file written by ``easyref split`` (each ``role == "target"`` row is one sample; its
references are the ``reference`` rows of the same group; image ``path`` values are relative to the ingest folder,
found through the ``split.json`` beside the split file or given with ``--images-root``), or with ``--dreambench DIR``
from a DreamBench folder (``DIR/<subject>/*.jpg`` + ``DIR/prompts_and_classes.txt``; every subject x prompt is a
sample whose references and targets are the subject's images).

Each sample is generated once per method with its own seed (derived from ``evaluate.seed`` and the sample id, so
it does not depend on batching or on which other samples are evaluated). Methods:

  easyref     the checkpoint, references encoded by the MLLM
  text        text-only SDXL: the same sampler with the reference attention at scale 0 (and any LoRA disabled)
  ip_adapter  IP-Adapter-SDXL via diffusers' ``load_ip_adapter``, conditioned on the mean CLIP image embedding of
              the group (the paper's multi-reference baseline)

Reference gain (no generation): the denoising loss of each sample's target with its own references vs with the
references of a sample of another group, at the same timesteps and noise. Positive = the model uses the group.

Writes to OUT: metrics.json (flat keys, for DVC), evaluation.json (provenance), samples.parquet / samples.csv (one
row per method and sample), images/<method>/<sample>.png, grids/<sample>.png (references | target | generated)
and report.html (one self-contained page), and logs all of it to MLflow.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.errors import UserError
from easyref.metrics import MetricModels, Summary, mean_ci

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from PIL import Image

    from easyref.sampler import EasyRefSampler

HELP = "evaluate a checkpoint: CLIP-I / CLIP-T / DINO-I, reference gain, baselines, report"

METHODS = ("easyref", "text", "ip_adapter")
BASELINES = ("text", "ip_adapter")
METRICS = ("clip_i", "clip_t", "dino_i", "colour")
METRIC_LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_i": "DINO-I", "colour": "Colour"}
SWAPPED = "easyref_swapped"
"""The checkpoint generating with another group's references (same caption and seed): the visual reference check."""
SPLIT_COLUMNS = ("image_id", "path", "group", "caption", "role")


# -- configuration ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class IPAdapterConfig:
    """Where the IP-Adapter-SDXL baseline comes from (arguments of diffusers' ``load_ip_adapter``)."""

    path: str | None = None
    """Hub id or folder of the IP-Adapter repository (real profile: ``h94/IP-Adapter``); None = ``ip_adapter/`` in
    the base-model folder (written by ``easyref tiny-models``)."""
    subfolder: str = "sdxl_models"
    """Folder of the weights inside ``path``."""
    weight_name: str = "ip-adapter_sdxl.safetensors"
    """Weights file inside ``subfolder``."""
    image_encoder_folder: str = "image_encoder"
    """CLIP image encoder folder, inside ``subfolder`` (or a path with a ``/`` relative to ``path``)."""
    scale: float = 1.0
    """IP-Adapter scale (``pipe.set_ip_adapter_scale``)."""


@dataclass(kw_only=True)
class ReferenceGainConfig:
    """The generation-free check that the model uses its references."""

    enabled: bool = True
    """Compute the reference gain for the checkpoint."""
    timesteps: int = 4
    """Noise draws (timestep + noise) per sample; the same draws serve the own and the other group."""


@dataclass(kw_only=True)
class DreamBenchConfig:
    """How DreamBench prompts are filled in."""

    unique_token: str = ""
    """Replaces ``{0}`` (DreamBooth's rare token, e.g. ``sks``); empty for zero-shot models: 'a backpack in ...'."""
    live_classes: list[str] = field(default_factory=lambda: ["cat", "dog"])
    """Classes whose subjects get the 'Live Subject Prompts' instead of the 'Object Prompts'."""


@dataclass(kw_only=True)
class EvaluateConfig:
    """The ``evaluate`` section of ``params.yaml``; command-line flags override it."""

    steps: int = 30
    """DDIM steps (paper: 30)."""
    guidance: float = 7.5
    """Classifier-free guidance weight (paper: 7.5)."""
    negative_prompt: str = ""
    """Text of the unconditional branch."""
    height: int | None = None
    """Generated image height (default: the UNet's native size)."""
    width: int | None = None
    """Generated image width (default: the UNet's native size)."""
    seed: int = 0
    """Base seed; each sample's seed is derived from it and the sample id."""
    batch_size: int = 4
    """Samples per sampler call (results do not depend on it)."""
    max_samples: int | None = None
    """Evaluate only the first N samples (None = all)."""
    baselines: list[str] = field(default_factory=list)
    """Baselines evaluated beside the checkpoint: any of ``text``, ``ip_adapter``."""
    confidence: float = 0.95
    """Level of the intervals reported around each mean."""
    report_samples: int = 16
    """Samples shown as grids in the report (grids are written for these only)."""
    experiment: str = "easyref-evaluate"
    """MLflow experiment of the evaluation runs."""
    metrics: MetricModels = field(default_factory=MetricModels)
    """The CLIP and DINO models of the metrics."""
    ip_adapter: IPAdapterConfig = field(default_factory=IPAdapterConfig)
    """The IP-Adapter baseline's weights."""
    reference_gain: ReferenceGainConfig = field(default_factory=ReferenceGainConfig)
    """The reference-gain check."""
    dreambench: DreamBenchConfig = field(default_factory=DreamBenchConfig)
    """DreamBench prompt filling."""
    swapped_references: bool = True
    """Also generate every sample with another group's references (method ``easyref_swapped``): if the model uses
    its references, these images follow the other group and score lower against the target."""
    caption_subsets: dict[str, list[str]] = field(default_factory=dict)
    """Named word lists; each adds a section of metrics over the samples whose caption contains none of its words,
    e.g. ``no_colour: [red, blue, ...]``: the samples where only the references show the colour."""
    report_note: str = ""
    """One line at the top of the report saying what this evaluation can and cannot show."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


# -- samples ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One test sample: a prompt, the reference group, and the image(s) the result is compared with."""

    sample_id: str
    group: str
    caption: str
    references: tuple[Path, ...]
    targets: tuple[Path, ...]
    seed: int

    @property
    def slug(self) -> str:
        """A file-name-safe form of the id."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "__", self.sample_id)


def sample_seed(base_seed: int, sample_id: str) -> int:
    """A per-sample seed that depends only on the base seed and the id."""
    return (zlib.crc32(sample_id.encode()) + 1_000_003 * base_seed) % (2**31)


def images_root_for(split_file: Path) -> Path:
    """The folder the split's image paths are relative to: the ingest folder named by ``split.json``, if any."""
    info = split_file.parent / "split.json"
    if info.is_file():
        try:
            manifest = json.loads(info.read_text()).get("manifest")
        except json.JSONDecodeError as exc:
            raise UserError(f"{info}: not valid JSON ({exc}); pass --images-root") from exc
        if manifest and Path(manifest).parent.is_dir():
            return Path(manifest).parent
    return split_file.parent


def load_split(split_file: str | Path, images_root: str | Path | None = None, base_seed: int = 0) -> list[Sample]:
    """Test samples of a held-in / held-out split file (see the module docstring)."""
    import pandas as pd

    split_file = Path(split_file)
    if not split_file.is_file():
        raise UserError(f"{split_file}: no such split file (written by `easyref split`)")
    try:
        frame = pd.read_parquet(split_file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise UserError(f"{split_file}: cannot read as parquet ({exc})") from exc
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{split_file}: missing column(s) {', '.join(missing)}; expected {', '.join(SPLIT_COLUMNS)}")
    root = Path(images_root) if images_root is not None else images_root_for(split_file)
    bad_roles = frame.loc[~frame["role"].isin(["target", "reference"])]
    if len(bad_roles):
        row = int(bad_roles.index[0])
        raise UserError(
            f"{split_file}: row {row}: role {bad_roles['role'].iloc[0]!r} is neither 'target' nor 'reference'"
        )
    for row, path in zip(frame.index, frame["path"], strict=True):
        if not (root / str(path)).is_file():
            raise UserError(
                f"{split_file}: row {row}: image {root / str(path)} does not exist; pass --images-root "
                "(the folder `easyref ingest` wrote)"
            )
    references = {
        g: tuple(root / p for p in rows["path"])
        for g, rows in frame[frame["role"] == "reference"].groupby("group", sort=False)
    }
    samples = []
    for row, target in frame[frame["role"] == "target"].iterrows():
        group = str(target["group"])
        if group not in references:
            raise UserError(f"{split_file}: row {row}: group {group!r} has a target but no reference rows")
        sample_id = str(target["image_id"])
        samples.append(
            Sample(
                sample_id=sample_id,
                group=group,
                caption=str(target["caption"]),
                references=references[group],
                targets=(root / str(target["path"]),),
                seed=sample_seed(base_seed, sample_id),
            )
        )
    if not samples:
        raise UserError(f"{split_file}: no rows with role 'target': nothing to evaluate")
    return samples


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_PROMPT_LINE = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*\.format\(""")


def parse_dreambench_prompts(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """``(classes, object_prompts, live_prompts)`` of DreamBench's ``prompts_and_classes.txt``.

    Classes are the ``subject_name,class`` lines of the ``Classes`` section; prompts are the quoted templates of
    ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines, under the ``Object Prompts`` and ``Live
    Subject Prompts`` headings. A file with only prompt lines gives the same prompts to every subject.
    """
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = "object"
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        lowered = line.lower()
        if lowered.startswith("live subject prompts"):
            section = "live"
        elif lowered.startswith("object prompts"):
            section = "object"
        elif match := _PROMPT_LINE.match(line):
            template = match["template"]
            if "{1}" not in template:
                raise UserError(f"{path}:{number}: prompt {template!r} has no {{1}} (class) placeholder")
            prompts[section].append(template)
        elif "," in line and " " not in line.split(",")[0] and lowered != "subject_name,class":
            subject, cls = (s.strip() for s in line.split(",", 1))
            classes[subject] = cls
    if not prompts["object"] and not prompts["live"]:
        raise UserError(f"{path}: no prompts found (expected lines like 'a {{0}} {{1}} in the snow'.format(...))")
    return classes, prompts["object"], prompts["live"] or prompts["object"]


def fill_prompt(template: str, unique_token: str, class_token: str) -> str:
    """``'a {0} {1} in the snow'`` -> ``'a sks dog in the snow'`` (or ``'a dog in the snow'`` with no token)."""
    return " ".join(template.format(unique_token, class_token).split())


def load_dreambench(root: str | Path, config: DreamBenchConfig, base_seed: int = 0) -> list[Sample]:
    """One sample per subject x prompt of a DreamBench folder; references and targets are the subject's images."""
    root = Path(root)
    prompts_file = root / "prompts_and_classes.txt"
    if not prompts_file.is_file():
        raise UserError(
            f"{root}: no prompts_and_classes.txt; expected DreamBench's layout (DIR/<subject>/*.jpg and "
            "DIR/prompts_and_classes.txt)"
        )
    classes, object_prompts, live_prompts = parse_dreambench_prompts(prompts_file)
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            continue
        cls = classes.get(folder.name, folder.name.replace("_", " "))
        templates = live_prompts if cls in config.live_classes else object_prompts
        for i, template in enumerate(templates):
            sample_id = f"{folder.name}/{i:02d}"
            samples.append(
                Sample(
                    sample_id=sample_id,
                    group=folder.name,
                    caption=fill_prompt(template, config.unique_token, cls),
                    references=images,
                    targets=images,
                    seed=sample_seed(base_seed, sample_id),
                )
            )
    if not samples:
        raise UserError(f"{root}: no subject folder with images")
    return samples


def load_image(path: Path) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc})") from exc


class ImageStore:
    """Opens each image file once per evaluation."""

    def __init__(self) -> None:
        self._images: dict[Path, Image.Image] = {}

    def __call__(self, path: Path) -> Image.Image:
        if path not in self._images:
            self._images[path] = load_image(path)
        return self._images[path]

    def group(self, paths: Sequence[Path]) -> list[Image.Image]:
        return [self(p) for p in paths]


# -- generation -------------------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _generators(batch: Sequence[Sample]) -> list[torch.Generator]:
    import torch

    return [torch.Generator().manual_seed(s.seed) for s in batch]


def generate_easyref(
    sampler: EasyRefSampler,
    samples: Sequence[Sample],
    store: ImageStore,
    config: EvaluateConfig,
    *,
    text_only: bool = False,
    references: Sequence[Sequence[Path]] | None = None,
) -> list[Image.Image]:
    """One image per sample with the EasyRef sampler; ``text_only`` = reference scale 0 and any LoRA disabled;
    ``references`` replaces each sample's own reference group (the swapped-reference check)."""
    from tqdm.auto import tqdm

    unet = sampler.model.unet
    lora = bool(getattr(unet, "peft_config", None))
    if text_only and lora:
        unet.disable_adapters()
    images: list[Image.Image] = []
    groups = list(references) if references is not None else [s.references for s in samples]
    try:
        desc = "text-only SDXL" if text_only else "easyref" if references is None else "easyref, swapped references"
        bar = tqdm(total=len(samples), desc=f"generating ({desc})", unit="image")
        for start, batch in zip(range(0, len(samples), config.batch_size), _batches(samples, config.batch_size),
                                strict=True):
            images += sampler(
                [s.caption for s in batch],
                [store.group(g) for g in groups[start : start + len(batch)]],
                negative_prompt=config.negative_prompt,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=_generators(batch),
                scale=0.0 if text_only else None,
                progress=False,
            )
            bar.update(len(batch))
        bar.close()
    finally:
        if text_only and lora:
            unet.enable_adapters()
    return images


class IPAdapterBaseline:
    """IP-Adapter-SDXL through diffusers, conditioned on the mean CLIP image embedding of each group."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @classmethod
    def from_pretrained(
        cls, sdxl: str | Path, config: IPAdapterConfig, device: str = "cpu", torch_dtype: torch.dtype | None = None
    ) -> IPAdapterBaseline:
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        encoder = config.image_encoder_folder
        subfolder = encoder if "/" in encoder else f"{config.subfolder}/{encoder}"
        # Passing the processor keeps diffusers from building a torchvision-backed CLIPImageProcessor.
        feature_extractor = _clip_image_processor(str(config.path), subfolder)
        pipe = StableDiffusionXLPipeline.from_pretrained(
            sdxl, feature_extractor=feature_extractor, torch_dtype=torch_dtype
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        try:
            pipe.load_ip_adapter(
                config.path,
                subfolder=config.subfolder,
                weight_name=config.weight_name,
                image_encoder_folder=config.image_encoder_folder,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"cannot load the IP-Adapter baseline from {config.path!r} (evaluate.ip_adapter): {exc}"
            ) from exc
        pipe.set_ip_adapter_scale(config.scale)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device))

    def group_embedding(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(1, D)``: the mean projected CLIP image embedding of a group."""
        import torch

        encoder = self.pipe.image_encoder
        pixels = self.pipe.feature_extractor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds
        return embeds.mean(dim=0, keepdim=True)

    def __call__(self, samples: Sequence[Sample], store: ImageStore, config: EvaluateConfig) -> list[Image.Image]:
        import torch
        from tqdm.auto import tqdm

        images: list[Image.Image] = []
        bar = tqdm(total=len(samples), desc="generating (ip_adapter)", unit="image")
        for batch in _batches(samples, config.batch_size):
            positive = torch.stack([self.group_embedding(store.group(s.references)) for s in batch])  # (B, 1, D)
            embeds = torch.cat([torch.zeros_like(positive), positive]) if config.guidance > 1 else positive
            images += self.pipe(
                prompt=[s.caption for s in batch],
                negative_prompt=[config.negative_prompt] * len(batch),
                ip_adapter_image_embeds=[embeds],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=_generators(batch),
            ).images
            bar.update(len(batch))
        bar.close()
        return images


def _clip_image_processor(path: str, subfolder: str) -> Any:
    """The image encoder's processor files if present, else what diffusers builds: resize + crop to its input size."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    try:
        return CLIPImageProcessorPil.from_pretrained(path, subfolder=subfolder)
    except OSError:
        pass
    try:
        side = CLIPVisionConfig.from_pretrained(path, subfolder=subfolder).image_size
    except OSError as exc:
        raise UserError(
            f"no IP-Adapter image encoder at {path!r} / {subfolder!r} (evaluate.ip_adapter): {exc}"
        ) from exc
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


# -- reference gain ---------------------------------------------------------------------------------------------------


def partners(samples: Sequence[Sample]) -> list[int | None]:
    """For each sample, the index of the next sample (cyclically) from another group; None if there is none."""
    out: list[int | None] = []
    n = len(samples)
    for i, sample in enumerate(samples):
        out.append(next((j % n for j in range(i + 1, i + n) if samples[j % n].group != sample.group), None))
    return out


def reference_gain(
    sampler: EasyRefSampler, samples: Sequence[Sample], store: ImageStore, sdxl: str | Path, config: EvaluateConfig
) -> list[dict[str, float]]:
    """Per sample: denoising loss with its own references, with another group's, and the gain (other - own).

    Both losses use the same target latents (VAE posterior mean), caption, timesteps and noise; only the reference
    group differs. The MLLM reads the sample's own caption in both cases.
    """
    import torch
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    scheduler = DDPMScheduler.from_pretrained(sdxl, subfolder="scheduler")
    pipe, model, device = sampler.pipe, sampler.model, sampler.device
    factor = pipe.vae_scale_factor
    height = config.height or model.unet.config.sample_size * factor
    width = config.width or model.unet.config.sample_size * factor
    k = config.reference_gain.timesteps
    results: list[dict[str, float]] = []
    nan = float("nan")
    for sample, partner in tqdm(
        list(zip(samples, partners(samples), strict=True)), desc="reference gain", unit="sample"
    ):
        if partner is None:
            results.append({"loss_own": nan, "loss_other": nan, "reference_gain": nan})
            continue
        with torch.no_grad():
            target = pipe.image_processor.preprocess(store(sample.targets[0]), height=height, width=width)
            latents = pipe.vae.encode(target.to(device, pipe.vae.dtype)).latent_dist.mean
            latents = (latents * pipe.vae.config.scaling_factor).repeat(k, 1, 1, 1)
            text, _, pooled, _ = pipe.encode_prompt(
                prompt=[sample.caption], device=device, num_images_per_prompt=k, do_classifier_free_guidance=False
            )
            generator = torch.Generator().manual_seed(sample.seed)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (k,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            noisy = scheduler.add_noise(latents, noise, timesteps.to(device))
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=text.dtype).repeat(
                k, 1
            )
            groups = [store.group(sample.references), store.group(samples[partner].references)]
            states = sampler.encode_references(groups, [sample.caption] * 2)
            losses = []
            for s in states:
                eps = model(
                    noisy, timesteps.to(device), text, pooled, time_ids, s[None].expand(k, -1, -1).to(text.dtype)
                )
                losses.append(torch.nn.functional.mse_loss(eps.float(), noise.float()).item())
        results.append({"loss_own": losses[0], "loss_other": losses[1], "reference_gain": losses[1] - losses[0]})
    return results


# -- metrics ----------------------------------------------------------------------------------------------------------


def score(
    samples: Sequence[Sample],
    generated: dict[str, list[Image.Image]],
    store: ImageStore,
    config: EvaluateConfig,
    cache_file: Path | None,
    device: str,
) -> pd.DataFrame:
    """One row per (method, sample) with CLIP-I, CLIP-T, DINO-I and colour (image metrics averaged over the
    targets)."""
    import pandas as pd
    import torch

    from easyref.metrics import ClipEmbedder, DinoEmbedder, EmbeddingCache, colour_similarity, cosine

    m = config.metrics
    clip = ClipEmbedder.from_pretrained(m.clip, batch_size=m.batch_size, device=device)
    dino = DinoEmbedder.from_pretrained(m.dino, batch_size=m.batch_size, device=device)
    cache = EmbeddingCache(cache_file)
    targets = sorted({t for s in samples for t in s.targets})
    index = {t: i for i, t in enumerate(targets)}
    target_emb = {e.name: cache.embed_files(e, targets, store) for e in (clip, dino)}
    cache.save()
    captions = clip.embed_texts([s.caption for s in samples])
    rows = []
    for method, images in generated.items():
        gen = {e.name: e.embed_images(images) for e in (clip, dino)}
        clip_t = cosine(gen["clip"], captions)
        for i, sample in enumerate(samples):
            t_idx = [index[t] for t in sample.targets]
            row: dict[str, Any] = {
                "method": method,
                "sample_id": sample.sample_id,
                "group": sample.group,
                "caption": sample.caption,
                "seed": sample.seed,
            }
            for name, key in (("clip", "clip_i"), ("dino", "dino_i")):
                g = gen[name][i : i + 1].expand(len(t_idx), -1)
                row[key] = float(cosine(g, target_emb[name][torch.tensor(t_idx)]).mean())
            row["clip_t"] = float(clip_t[i])
            row["colour"] = sum(colour_similarity(images[i], store(t)) for t in sample.targets) / len(sample.targets)
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(
    table: pd.DataFrame, confidence: float, subsets: dict[str, list[str]] | None = None
) -> dict[str, dict[str, Summary]]:
    """``{method: {metric: Summary}}`` over the samples of each method, then ``{"SUBSET/method": ...}`` over the
    samples whose caption contains none of the words of each of ``subsets``."""
    columns = [c for c in (*METRICS, "loss_own", "loss_other", "reference_gain") if c in table.columns]
    out: dict[str, dict[str, Summary]] = {}
    sections = [("", table)]
    for name, words in (subsets or {}).items():
        sections.append((f"{name}/", table[[not caption_mentions(c, words) for c in table["caption"]]]))
    for prefix, frame in sections:
        for method, rows in frame.groupby("method", sort=False):
            out[f"{prefix}{method}"] = {
                c: mean_ci(rows[c].tolist(), confidence) for c in columns if rows[c].notna().any()
            }
    return out


def caption_mentions(caption: str, words: Sequence[str]) -> bool:
    """Whether ``caption`` contains any of ``words`` as a whole word (case-insensitive)."""
    tokens = set(re.findall(r"[\w-]+", caption.lower()))
    return any(w.lower() in tokens for w in words)


def flat_metrics(summary: dict[str, dict[str, Summary]], num_samples: int) -> dict[str, float]:
    """``{"easyref.clip_i": .., "easyref.clip_i.ci_low": .., ...}``: the flat form DVC and MLflow take."""
    flat: dict[str, float] = {"num_samples": float(num_samples)}
    for method, metrics in summary.items():
        for name, s in metrics.items():
            flat[f"{method}.{name}"] = s.mean
            flat[f"{method}.{name}.ci_low"] = s.low
            flat[f"{method}.{name}.ci_high"] = s.high
    return {k: (None if v != v else round(v, 6)) for k, v in flat.items()}  # NaN -> null in JSON


# -- report -----------------------------------------------------------------------------------------------------------


def _thumb(image: Image.Image, cell: int) -> Image.Image:
    from PIL import Image

    im = image.convert("RGB")
    im.thumbnail((cell, cell))
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


GRID_LABELS = {SWAPPED: "swapped refs", "text": "text only", "ip_adapter": "ip-adapter"}


def make_grid(
    references: Sequence[Image.Image],
    target: Image.Image,
    generated: dict[str, Image.Image],
    cell: int = 128,
    max_refs: int = 4,
) -> Image.Image:
    """One row: up to ``max_refs`` references | target | one generated image per method, each labelled."""
    from PIL import Image, ImageDraw

    columns = [(f"ref {i + 1}", im) for i, im in enumerate(references[:max_refs])]
    columns += [("target", target)] + [(GRID_LABELS.get(name, name), im) for name, im in generated.items()]
    label_h, gap = 16, 8
    groups_before = {len(references[:max_refs]), len(references[:max_refs]) + 1}  # gaps after refs and target
    width = len(columns) * cell + gap * len(groups_before)
    grid = Image.new("RGB", (width, cell + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    x = 0
    for i, (label, im) in enumerate(columns):
        if i in groups_before:
            x += gap
        grid.paste(_thumb(im, cell), (x, label_h))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        x += cell
    return grid


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(s: Summary | None) -> str:
    if s is None or s.mean != s.mean:
        return "&ndash;"
    if s.low != s.low:
        return f"{s.mean:.3f}"
    return f"{s.mean:.3f} <small>[{s.low:.3f}, {s.high:.3f}]</small>"


METHOD_LABELS = {
    "easyref": "EasyRef (checkpoint)",
    SWAPPED: "EasyRef, another group's references",
    "text": "SDXL, text only",
    "ip_adapter": "IP-Adapter-SDXL (mean)",
}


def render_report(
    summary: dict[str, dict[str, Summary]],
    info: dict[str, Any],
    grids: Sequence[tuple[str, str, Image.Image]],
    confidence: float,
) -> str:
    """A self-contained HTML page: the metrics table, provenance and the grids (embedded as PNG data URIs)."""
    pct = f"{confidence:.0%}"
    head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRICS)
    rows, section = [], ""
    for key, metrics in summary.items():
        prefix, _, method = key.rpartition("/")
        if prefix != section:
            section = prefix
            rows.append(f"<tr><th colspan='{len(METRICS) + 2}'>samples whose caption has no "
                        f"{html.escape(prefix.removeprefix('no_'))} word</th></tr>")
        rows.append(
            f"<tr><td>{html.escape(METHOD_LABELS.get(method, method))}</td>"
            + "".join(f"<td>{_cell(metrics.get(m))}</td>" for m in METRICS)
            + f"<td>{_cell(metrics.get('reference_gain'))}</td></tr>"
        )
    note = f"<p class='note'>{html.escape(str(info.get('note', '')))}</p>" if info.get("note") else ""
    gain = summary.get("easyref", {})
    gain_text = ""
    if "reference_gain" in gain:
        gain_text = (
            f"<p>Reference gain: denoising loss with another group's references "
            f"{_cell(gain.get('loss_other'))} minus with the sample's own {_cell(gain.get('loss_own'))} = "
            f"<b>{_cell(gain['reference_gain'])}</b>. Positive means the model uses its references.</p>"
        )
    provenance = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items() if k != "note"
    )
    figures = "".join(
        f"<figure><img src='{_data_uri(img)}' alt='grid {html.escape(sid)}'><figcaption><code>{html.escape(sid)}"
        f"</code> &mdash; {html.escape(caption)}</figcaption></figure>"
        for sid, caption, img in grids
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EasyRef evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
p.note {{ background: #fff6d5; padding: 6px 10px; }}
small {{ color: #666; }} figure {{ margin: 1em 0; }} figcaption {{ font-size: 90%; color: #444; }}
</style></head><body>
<h1>EasyRef evaluation</h1>
{note}
<h2>Metrics</h2>
<p>Means over samples with {pct} t-intervals. CLIP-I / DINO-I: cosine similarity of generated and target image
embeddings (CLIP image tower / DINOv2 CLS); CLIP-T: generated image vs caption (CLIP); Colour: overlap of the hue
histograms of the saturated pixels of generated and target image (1 = same colours). Higher is better. A model that
uses its references scores higher with its own references than with another group's.</p>
<table><tr><th>method</th>{head}<th>reference gain</th></tr>{"".join(rows)}</table>
{gain_text}
<h2>Run</h2><table>{provenance}</table>
<h2>Samples</h2><p>Each row: references | target | generated by each method, same seed
(<i>swapped</i>: the same caption with another group's references).</p>
{figures}
</body></html>
"""


def write_outputs(
    out: Path,
    samples: Sequence[Sample],
    generated: dict[str, list[Image.Image]],
    table: pd.DataFrame,
    summary: dict[str, dict[str, Summary]],
    info: dict[str, Any],
    store: ImageStore,
    config: EvaluateConfig,
) -> dict[str, float]:
    """Images, grids, per-sample table, metrics.json, evaluation.json and report.html under ``out``."""
    from easyref.data.parquet import write_json

    for method, images in generated.items():
        folder = out / "images" / method
        folder.mkdir(parents=True, exist_ok=True)
        for sample, image in zip(samples, images, strict=True):
            image.save(folder / f"{sample.slug}.png")
    table = table.copy()
    slugs = {s.sample_id: s.slug for s in samples}
    table["image"] = [
        f"images/{m}/{slugs[sid]}.png" for m, sid in zip(table["method"], table["sample_id"], strict=True)
    ]
    table.to_parquet(out / "samples.parquet", index=False)
    table.to_csv(out / "samples.csv", index=False)

    grids = []
    (out / "grids").mkdir(exist_ok=True)
    for i, sample in enumerate(samples[: config.report_samples]):
        grid = make_grid(
            store.group(sample.references), store(sample.targets[0]), {m: images[i] for m, images in generated.items()}
        )
        grid.save(out / "grids" / f"{sample.slug}.png")
        grids.append((sample.sample_id, sample.caption, grid))

    metrics = flat_metrics(summary, len(samples))
    write_json(metrics, out / "metrics.json")
    write_json(info, out / "evaluation.json")
    (out / "report.html").write_text(render_report(summary, info, grids, config.confidence))
    return metrics


# -- MLflow -----------------------------------------------------------------------------------------------------------


def log_to_mlflow(
    out: Path, metrics: dict[str, float | None], config: EvaluateConfig, info: dict[str, Any], tracking_uri: str | None
) -> str:
    """One MLflow run with the config as params, the flat metrics and the outputs as artifacts; its id."""
    import mlflow

    from easyref.config import flatten, to_dict
    from easyref.registry import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    mlflow.set_experiment(config.experiment)
    params = {f"evaluate.{k}": str(v)[:500] for k, v in flatten(to_dict(config)).items()}
    params.update(
        {k: str(v)[:500] for k, v in info.items() if k in ("checkpoint_sha256", "split_sha256", "split", "checkpoint")}
    )
    with mlflow.start_run(run_name=f"evaluate {Path(str(info.get('checkpoint', ''))).name}") as run:
        mlflow.set_tags(
            {
                "easyref.step": "evaluate",
                **{f"easyref.{k}": str(v) for k, v in info.items() if k.endswith("sha256") or k == "git_commit"},
            }
        )
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
        for name in ("metrics.json", "evaluation.json", "samples.csv", "report.html"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifacts(str(out / "grids"), artifact_path="grids")
        return run.info.run_id


# -- command ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained EasyRef checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, help="held_in.parquet or held_out.parquet written by easyref split")
    source.add_argument(
        "--dreambench", type=Path, metavar="DIR", help="a DreamBench folder (<subject>/*.jpg + prompts_and_classes.txt)"
    )
    parser.add_argument(
        "--images-root", type=Path, help="folder the split's image paths are relative to (default: from split.json)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--baseline",
        action="append",
        choices=BASELINES,
        default=None,
        help="also evaluate this baseline (repeatable; default: evaluate.baselines of --params)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="evaluate the checkpoint only")
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("models/tiny"),
        help="folder holding the base models sdxl/ and mllm/ (default: models/tiny)",
    )
    parser.add_argument("--params", type=Path, help="read the 'evaluate' section of this params.yaml")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 30)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight (default 7.5)")
    parser.add_argument("--seed", type=int, help="base seed of the per-sample seeds (default 0)")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, help="samples per sampler call (default 4)")
    parser.add_argument("--no-reference-gain", action="store_true", help="skip the reference-gain check")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The ``evaluate`` section of ``--params`` (if given) with the flags that were set applied on top."""
    from easyref.config import load_section

    baselines = [] if args.no_baselines else list(dict.fromkeys(args.baseline)) if args.baseline else None
    flags = {
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "baselines": baselines,
    }
    config = load_section(EvaluateConfig, args.params, "evaluate", flags)
    if args.no_reference_gain:
        config = dataclasses.replace(config, reference_gain=dataclasses.replace(config.reference_gain, enabled=False))
    return config


def with_base_defaults(config: EvaluateConfig, base: Path) -> EvaluateConfig:
    """Fill model locations left unset (None) from the base-model folder: clip/, dino/, ip_adapter/."""
    metrics = dataclasses.replace(
        config.metrics, clip=config.metrics.clip or str(base / "clip"), dino=config.metrics.dino or str(base / "dino")
    )
    ip_adapter = dataclasses.replace(config.ip_adapter, path=config.ip_adapter.path or str(base / "ip_adapter"))
    return dataclasses.replace(config, metrics=metrics, ip_adapter=ip_adapter)


def evaluate(
    checkpoint: Path,
    samples: Sequence[Sample],
    out: Path,
    base: Path,
    config: EvaluateConfig,
    info: dict[str, Any],
    device: str,
    tracking_uri: str | None = None,
) -> dict[str, float | None]:
    """Generate, score and report ``samples`` for the checkpoint and the configured baselines."""
    import gc

    import pandas as pd
    import torch

    from easyref.sampler import EasyRefSampler, base_paths

    sdxl, mllm = base_paths(base)
    config = with_base_defaults(config, base)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    store = ImageStore()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sampler = EasyRefSampler.from_pretrained(sdxl, mllm, checkpoint=checkpoint, device=device, torch_dtype=dtype)
    generated = {"easyref": generate_easyref(sampler, samples, store, config)}
    others = partners(samples)
    if config.swapped_references and all(j is not None for j in others):
        swapped = [samples[j].references for j in others if j is not None]
        generated[SWAPPED] = generate_easyref(sampler, samples, store, config, references=swapped)
    gains = reference_gain(sampler, samples, store, sdxl, config) if config.reference_gain.enabled else None
    if "text" in config.baselines:
        generated["text"] = generate_easyref(sampler, samples, store, config, text_only=True)
    del sampler
    gc.collect()
    if "ip_adapter" in config.baselines:
        baseline = IPAdapterBaseline.from_pretrained(sdxl, config.ip_adapter, device=device, torch_dtype=dtype)
        generated["ip_adapter"] = baseline(samples, store, config)
        del baseline
        gc.collect()

    table = score(samples, generated, store, config, out / ".cache" / "target_embeddings.safetensors", device)
    if gains is not None:
        gain_frame = pd.DataFrame(gains).assign(method="easyref", sample_id=[s.sample_id for s in samples])
        table = table.merge(gain_frame, on=["method", "sample_id"], how="left")
    summary = summarize(table, config.confidence, config.caption_subsets)
    info = {
        **({"note": config.report_note} if config.report_note else {}),
        **info,
        "num_samples": len(samples),
        "methods": ", ".join(generated),
        "steps": config.steps,
        "guidance": config.guidance,
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics = write_outputs(out, samples, generated, table, summary, info, store, config)
    run_id = log_to_mlflow(out, metrics, config, info, tracking_uri)
    print(f"logged to MLflow run {run_id}")
    return metrics


def run(args: argparse.Namespace) -> int:
    import torch

    from easyref.data.parquet import sha256_file
    from easyref.model import read_checkpoint_config
    from easyref.registry import checkpoint_sha256, git_commit
    from easyref.threads import configure_cpu_threads

    configure_cpu_threads()

    config = config_from_args(args)
    read_checkpoint_config(args.checkpoint)  # a clear error before anything is loaded
    if args.split is not None:
        samples = load_split(args.split, args.images_root, config.seed)
        info: dict[str, Any] = {"split": str(args.split), "split_sha256": sha256_file(args.split)}
    else:
        samples = load_dreambench(args.dreambench, config.dreambench, config.seed)
        info = {"dreambench": str(args.dreambench)}
    if config.max_samples is not None:
        samples = samples[: config.max_samples]
    info = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
        **info,
        "git_commit": git_commit(),
    }
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(args.checkpoint, samples, args.out, args.base, config, info, device, args.tracking_uri)
    for key in sorted(k for k in metrics if k.count(".") == 1):
        print(f"{key:28s} {metrics[key]}")
    print(f"report: {args.out / 'report.html'}")
    return 0
