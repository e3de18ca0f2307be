"""Build the base models' architectures from their config files alone, with random weights, without a download.

``configs/real/`` (package data) holds the published config files of SDXL base 1.0, Qwen2-VL-2B-Instruct, CLIP
ViT-L/14, DINOv2-small and the IP-Adapter SDXL image encoder (OpenCLIP ViT-bigG/14), laid out as the model tree
``easyref base-models`` writes (``sdxl/unet/config.json``, ``mllm/config.json``, ...). A tiny tree written by
``easyref tiny-models`` has the same layout, so every function here takes either root.

On ``device="meta"`` nothing is allocated: parameter counts, FLOPs and saved-activation sizes can be computed for
the real sizes on any laptop (``easyref plan``). On a GPU, ``dtype=torch.bfloat16`` builds the real sizes with
random weights directly on the card (``benchmarks/gpu_check.py``); on a CPU, in bf16, for one full-size training step
(``benchmarks/full_size_step.py``).

:func:`random_base_models` adds what the trainer and the sampler need besides the architectures: tokenizers and the
reference processor. The real vocabularies are a download away, so they come from a tiny model tree (``easyref
tiny-models``): its byte-level tokenizers give other token ids and about 3x longer text (one token per byte), which
makes MLLM figures slightly pessimistic; the image processor follows the profile's own preprocessor config.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyref.errors import UserError
from easyref.model import EasyRef, ModelConfig, ReferenceEncoder

REAL_CONFIGS = Path(__file__).parent / "configs" / "real"


def config_root(profile: str) -> Path:
    """The config tree of a profile name (``real``) or a folder holding the model layout."""
    if profile == "real":
        return REAL_CONFIGS
    root = Path(profile)
    if not (root / "sdxl" / "unet" / "config.json").is_file():
        raise UserError(f"{profile}: not a profile; use 'real' or a folder with sdxl/unet/config.json (a model tree)")
    return root


def read_json(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _cast(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Every parameter in ``dtype``: transformers builds parts in the dtype a config names (``torch_dtype: float16``
    in SDXL's text_encoder_2, bfloat16 in Qwen2-VL's vision config), whatever the default dtype."""
    return module.to(dtype) if dtype is not None else module


@contextlib.contextmanager
def _building(device: str | torch.device, dtype: torch.dtype | None):
    """Create parameters on ``device`` in ``dtype`` (factory functions follow the default device and dtype)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class BaseArchitectures:
    """Randomly initialised base models of one profile."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    mllm: nn.Module
    scheduler_config: dict[str, Any]


def build_unet(root: Path, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with _building(device, dtype):
        return UNet2DConditionModel.from_config(read_json(root / "sdxl" / "unet" / "config.json"))


def build_vae(root: Path, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    from diffusers import AutoencoderKL

    with _building(device, dtype):
        return AutoencoderKL.from_config(read_json(root / "sdxl" / "vae" / "config.json"))


def build_text_encoders(
    root: Path, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> tuple[nn.Module, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    one = CLIPTextConfig(**read_json(root / "sdxl" / "text_encoder" / "config.json"))
    two = CLIPTextConfig(**read_json(root / "sdxl" / "text_encoder_2" / "config.json"))
    with _building(device, dtype):
        return _cast(CLIPTextModel(one), dtype), _cast(CLIPTextModelWithProjection(two), dtype)


def mllm_config(root: Path, token_ids: dict[str, int] | None = None) -> Any:
    """Qwen2-VL config; ``token_ids`` (e.g. ``image_token_id``) replace the special-token ids of the file."""
    from transformers import Qwen2VLConfig

    data = read_json(root / "mllm" / "config.json")
    data.update(token_ids or {})
    return Qwen2VLConfig(**data)


def build_mllm(
    root: Path,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    token_ids: dict[str, int] | None = None,
) -> nn.Module:
    from transformers import Qwen2VLForConditionalGeneration

    with _building(device, dtype):
        return _cast(Qwen2VLForConditionalGeneration(mllm_config(root, token_ids)), dtype)


def build_image_encoder(root: Path, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> nn.Module:
    """The IP-Adapter SDXL image encoder (a CLIP vision tower with projection)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**read_json(root / "ip_adapter" / "sdxl_models" / "image_encoder" / "config.json"))
    with _building(device, dtype):
        return _cast(CLIPVisionModelWithProjection(config), dtype)


def build_base(
    root: Path,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    token_ids: dict[str, int] | None = None,
) -> BaseArchitectures:
    text_encoder, text_encoder_2 = build_text_encoders(root, device, dtype)
    return BaseArchitectures(
        unet=build_unet(root, device, dtype),
        vae=build_vae(root, device, dtype),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        mllm=build_mllm(root, device, dtype, token_ids),
        scheduler_config=read_json(root / "sdxl" / "scheduler" / "scheduler_config.json"),
    )


def build_easyref(
    root: Path,
    config: ModelConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    unet: nn.Module | None = None,
    mllm: nn.Module | None = None,
) -> EasyRef:
    """The project's :class:`EasyRef` (reference encoder, projector, 70 IP layers, LoRA if ``config.lora_rank``)."""
    unet = unet if unet is not None else build_unet(root, device, dtype)
    mllm = mllm if mllm is not None else build_mllm(root, device, dtype)
    with _building(device, dtype):
        return EasyRef(ReferenceEncoder(mllm, config), unet, config)


def count(params: Any) -> int:
    return sum(p.numel() for p in params)


SPECIAL_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
"""The MLLM config's special-token ids, replaced by the ids of the tokenizer actually used."""


def profile_model_config(real: bool) -> ModelConfig:
    """The model wiring of a profile: the paper's for ``real``; for a tiny tree, 16 tokens and small references."""
    if real:
        return ModelConfig()
    return ModelConfig(num_tokens=16, min_pixels=4 * 784, max_pixels=9 * 784, dropped_image_size=56)


def reference_side(config: ModelConfig) -> int:
    """The side (multiple of 28) of the largest square reference ``config`` keeps at its size."""
    return int(config.max_pixels**0.5) // 28 * 28


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in SPECIAL_TOKENS.items()}


def image_processor(root: Path, config: ModelConfig) -> Any:
    """Qwen2-VL's image processor with the patch, merge and normalisation settings of ``root``'s MLLM and the pixel
    limits of ``config``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = read_json(root / "mllm" / "preprocessor_config.json")
    keep = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    return Qwen2VLImageProcessorPil(
        **{k: settings[k] for k in keep if k in settings}, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )


def random_base_models(
    root: Path, tiny: Path, config: ModelConfig, device: str | torch.device, dtype: torch.dtype
) -> tuple[BaseArchitectures, Any]:
    """Random base models of ``root`` on ``device`` in ``dtype`` and the :class:`~easyref.base_models.BaseModels`
    bundle over them (VAE, text encoders, tokenizers and reference processor from the tiny tree ``tiny``, schedules):
    what the trainer's conditioning and the sampler take."""
    from transformers import AutoTokenizer

    from easyref.base_models import BaseModels
    from easyref.model import ReferenceProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny / "mllm", padding_side="left")
    arch = build_base(root, device, dtype, token_ids=special_token_ids(tokenizer))
    clip_tokenizer = AutoTokenizer.from_pretrained(tiny / "sdxl" / "tokenizer")
    bundle = BaseModels(
        vae=arch.vae,
        text_encoder=arch.text_encoder,
        text_encoder_2=arch.text_encoder_2,
        tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer,
        scheduler_config=arch.scheduler_config,
        processor=ReferenceProcessor(tokenizer, image_processor(root, config), config),
        torch_dtype=dtype,
    )
    return arch, bundle
