"""The ``evaluate`` section of ``params.yaml`` (dataclasses) and the names of methods and metrics.

A leaf: it imports nothing of the project and no third-party library, so every evaluate module (and the plugin
package of baselines) can import it without an import running back up. Baselines are known by their module files
(:func:`known_baselines` lists them without importing them).
"""

from __future__ import annotations

import math
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("clip_i", "clip_t", "dino_i", "colour", "colour_match")
METRIC_LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino_i": "DINO-I", "colour": "Colour",
                 "colour_match": "Colour match"}
SWAPPED = "easyref_swapped"
"""The checkpoint generating with another group's references (same caption and seed): the visual reference check."""
TEXT = "text"
"""Text-only SDXL: the checkpoint's sampler with the reference attention at scale 0 (and any LoRA disabled)."""
HEADLINE_METHODS = (TEXT, "ip_adapter", "lora", "easyref")
"""The methods of the paper's Table 3, in its order: the rows of the report's Table 3 and of headline.json."""
PAIRED = "paired"
"""Key prefix of the paired comparisons (``paired/easyref_vs_text.clip_i``): see :mod:`easyref.evaluate.paired`."""
BASELINES_FOLDER = Path(__file__).with_name("baselines")


def known_baselines() -> tuple[str, ...]:
    """Every baseline ``evaluate`` knows: ``text`` and each module file of ``easyref.evaluate.baselines`` (a
    baseline module is named after its method; listed, not imported)."""
    found = (info.name for info in pkgutil.iter_modules([str(BASELINES_FOLDER)]) if not info.name.startswith("_"))
    return (TEXT, *sorted(found))


def pair_key(method: str, baseline: str) -> str:
    """``paired/easyref_vs_text``: the summary key of ``method`` minus ``baseline`` on the same samples."""
    return f"{PAIRED}/{method}_vs_{baseline}"


@dataclass(kw_only=True)
class MetricModels:
    """Where the metric models come from (``evaluate.metrics`` in ``params.yaml``)."""

    clip: str | None = None
    """CLIP model (hub id or folder) for CLIP-I and CLIP-T; the paper uses ``openai/clip-vit-large-patch14``.
    None = ``clip/`` in the base-model folder (the tiny profile)."""
    dino: str | None = None
    """DINOv2 model (hub id or folder) for DINO-I; the paper uses ``facebook/dinov2-small``. None = ``dino/`` in
    the base-model folder."""
    batch_size: int = 32
    """Images (or captions) embedded per forward pass."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
class LoraBaselineConfig:
    """The per-group LoRA baseline: a LoRA fine-tuned on each group's references, then text-only generation."""

    rank: int = 32
    """LoRA rank on the UNet attention q, k, v, out (paper: 32)."""
    steps: int = 20
    """Fine-tuning steps per group (the tiny profile's default; the paper's tuning runs far longer)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA weights."""
    batch_size: int = 2
    """Reference images (with their captions) per fine-tuning step."""
    noise_offset: float = 0.0
    """Offset noise of the tuning steps, as ``train.noise_offset`` (give it the same value: EasyRef and the
    IP-Adapter baseline train with it, and a like-for-like comparison tunes the LoRA with it too)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"lora_baseline: rank, steps and batch_size must be >= 1, got {self}")
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            raise ValueError(f"lora_baseline: noise_offset must be a finite number >= 0, got {self.noise_offset}")


@dataclass(kw_only=True)
class ReferenceGainConfig:
    """The generation-free check that the model uses its references."""

    enabled: bool = True
    """Compute the reference gain for the checkpoint."""
    timesteps: int = 4
    """Noise draws (timestep + noise) per sample; the same draws serve the own and the other group."""


@dataclass(kw_only=True)
class DreamBenchConfig:
    """The DreamBench section: where its folder is and how its prompts are filled in."""

    folder: str | None = None
    """A DreamBench folder (``<subject>/*.jpg`` + ``prompts_and_classes.txt``) evaluated as a third section by every
    run (``--dreambench DIR`` overrides it, ``--no-dreambench`` skips it); None = no DreamBench section."""
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
    reference_scale: float = 1.0
    """Scale of EasyRef's reference attention when it generates (own and swapped references; 1 = as trained, 0 =
    the branch off). The reference gain is measured at the trained scale whatever this is."""
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
    """Evaluate at most N samples of each section, taken from its groups in turn (None = all)."""
    images_per_sample: int = 1
    """Images each method generates per sample, each with its own seed (the first with the sample's seed); a
    sample's metrics are their mean, so the sampler's noise weighs less in every mean and interval (DreamBench draws
    4 per prompt). The reference gain is measured once per sample (it draws its own noise)."""
    baselines: list[str] = field(default_factory=list)
    """Baselines evaluated beside the checkpoint: ``text`` or any module of ``easyref.evaluate.baselines``
    (``ip_adapter``, ``lora``)."""
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
    lora_baseline: LoraBaselineConfig = field(default_factory=LoraBaselineConfig)
    """The per-group LoRA baseline's fine-tuning."""
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
    palette: dict[str, list[int]] = field(default_factory=dict)
    """Named subject colours (``red: [215, 30, 35]``); when given, the metric ``colour_match`` is the share of
    targets whose subject is drawn in the same named colour as the generated image's (a rate, where ``colour`` is
    a similarity). Data whose subjects have no such palette (real photographs) leave it empty."""
    palette_backgrounds: list[list[int]] = field(default_factory=list)
    """Background colours that are nobody's subject (pixels near them do not vote for a colour)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.reference_scale) and self.reference_scale >= 0):
            raise ValueError(f"reference_scale must be a finite number >= 0, got {self.reference_scale}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.images_per_sample < 1:
            raise ValueError(f"images_per_sample must be >= 1, got {self.images_per_sample}")
        known = known_baselines()
        unknown = sorted(set(self.baselines) - set(known))
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(known)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        for name, rgb in {**self.palette, **dict(enumerate(self.palette_backgrounds))}.items():
            if len(rgb) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb):
                raise ValueError(f"palette: {name!r} must be three integers 0-255 (R, G, B), got {rgb!r}")
        if PAIRED in self.caption_subsets:
            raise ValueError(f"caption_subsets: {PAIRED!r} names the paired comparisons' keys; choose another name")
