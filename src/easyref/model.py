"""The EasyRef model: a Qwen2-VL reference encoder, a condition projector and decoupled cross-attention in SDXL.

* :class:`ModelConfig` (:mod:`easyref.model_config`) says how EasyRef is wired onto its base models.
* :class:`ReferenceProcessor` turns groups of reference images plus captions into one Qwen2-VL user turn each, and
  :class:`ReferenceEncoder` runs the Qwen2-VL trunk over that context, appends ``num_tokens`` learnable reference
  tokens at the input of the insertion layer and returns their final hidden states: the group representation
  (both in :mod:`easyref.reference`, the MLLM side).
* :class:`ConditionProjector` maps those states to the UNet's cross-attention width. It is installed as the UNet's
  ``encoder_hid_proj`` so the UNet's own IP-Adapter path (``added_cond_kwargs["image_embeds"]``) projects it.
* :func:`install_decoupled_attention` puts diffusers' ``IPAdapterAttnProcessor2_0`` on every ``attn2`` with
  ``to_k_ip``/``to_v_ip`` initialised from the layer's ``to_k``/``to_v``.
* :class:`EasyRef` holds the trainable model (reference encoder + UNet with adapter) and saves/loads the trained
  parts as safetensors + JSON on top of the base models.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from easyref.atomic import atomic_folder, restore_interrupted, verify_folder
from easyref.config import from_dict, load_json_object, to_dict
from easyref.errors import UserError
from easyref.model_config import AGGREGATIONS, DEFAULT_INSTRUCTION, ModelConfig  # noqa: F401 (the model's API)
from easyref.reference import ReferenceEncoder, ReferenceProcessor, common_length  # noqa: F401

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

CHECKPOINT_WEIGHTS = "easyref.safetensors"
CHECKPOINT_CONFIG = "easyref_config.json"

# Named groups of tensors of :class:`EasyRef`. A checkpoint stores the parts a stage trained.
PARTS = ("reference", "adapter", "mllm", "lora")


@dataclass(kw_only=True)
class CheckpointConfig:
    """What ``easyref_config.json`` records beside the trained weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parts: list[str] = field(default_factory=lambda: ["reference", "adapter"])
    """Which tensor groups the weights file holds (see :data:`PARTS`)."""
    base: dict[str, str] = field(default_factory=dict)
    """The base models the weights were trained on (for the record; ``--base`` decides what is loaded)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: stage, step, data hash, git commit."""


class ConditionProjector(nn.Module):
    """Per token: Linear(d, d) -> GELU -> Linear(d, cross_attention_dim) -> LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def install_decoupled_attention(
    unet: UNet2DConditionModel, projector: nn.Module, num_tokens: int, scale: float = 1.0
) -> None:
    """Give every cross-attention of ``unet`` a reference branch, the IP-Adapter way.

    ``attn2`` layers get ``IPAdapterAttnProcessor2_0`` whose ``to_k_ip``/``to_v_ip`` start as copies of the
    layer's ``to_k``/``to_v``; other layers keep plain SDPA attention. ``projector`` becomes the UNet's
    ``encoder_hid_proj``, so ``added_cond_kwargs={"image_embeds": [states[:, None]]}`` feeds the reference branch,
    exactly as diffusers' SDXL pipeline feeds ``ip_adapter_image_embeds``.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    processors: dict[str, nn.Module] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            proc = IPAdapterAttnProcessor2_0(
                hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features,
                num_tokens=(num_tokens,),
                scale=scale,
            ).to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
            with torch.no_grad():
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            processors[name] = proc
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projector])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


def adapter_processors(unet: nn.Module) -> list[nn.Module]:
    """The reference-branch processors installed by :func:`install_decoupled_attention`."""
    return [p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]


def set_adapter_scale(unet: nn.Module, scale: float) -> None:
    for proc in adapter_processors(unet):
        proc.scale = [scale]


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class EasyRef(nn.Module):
    """Reference encoder + SDXL UNet with decoupled cross-attention: everything EasyRef trains.

    ``forward`` predicts noise for noisy latents given text conditioning and encoded references; the frozen VAE
    and text encoders live outside (in the sampler and the trainer).
    """

    def __init__(self, reference_encoder: ReferenceEncoder, unet: UNet2DConditionModel, config: ModelConfig):
        super().__init__()
        self.config = config
        self.reference_encoder = reference_encoder
        self.unet = unet
        projector = ConditionProjector(reference_encoder.hidden_size, unet.config.cross_attention_dim)
        install_decoupled_attention(unet, projector, config.num_tokens, config.adapter_scale)
        if config.lora_rank:
            self.add_lora(config.lora_rank)

    @classmethod
    def from_base(
        cls, sdxl: str | Path, mllm: str | Path, config: ModelConfig, torch_dtype: torch.dtype | None = None
    ) -> EasyRef:
        """Build on base models (hub ids or folders), with freshly initialised EasyRef parts."""
        from diffusers import UNet2DConditionModel
        from transformers import Qwen2VLForConditionalGeneration

        with base_model_errors("base UNet", Path(sdxl) / "unet"):
            unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet", torch_dtype=torch_dtype)
        with base_model_errors("base MLLM", mllm):
            base_mllm = Qwen2VLForConditionalGeneration.from_pretrained(mllm, torch_dtype=torch_dtype)
        model = cls(ReferenceEncoder(base_mllm, config), unet, config)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model

    @property
    def projector(self) -> ConditionProjector:
        return self.unet.encoder_hid_proj.image_projection_layers[0]

    def add_lora(self, rank: int) -> None:
        """Attach a peft LoRA of ``rank`` to the UNet's attention q, k, v, out (stages 2-3)."""
        from peft import LoraConfig

        if getattr(self.unet, "peft_config", None):
            return
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
        )
        self.config.lora_rank = rank

    def set_scale(self, scale: float) -> None:
        set_adapter_scale(self.unet, scale)

    def encode_references(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, num_tokens, mllm_hidden)`` group representations for processed reference inputs."""
        return self.reference_encoder(inputs)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        pooled_text: torch.Tensor,
        time_ids: torch.Tensor,
        reference_states: torch.Tensor,
    ) -> torch.Tensor:
        """Noise prediction; ``reference_states`` are :meth:`encode_references` outputs (before projection)."""
        added = {"text_embeds": pooled_text, "time_ids": time_ids, "image_embeds": [reference_states[:, None]]}
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=text_states, added_cond_kwargs=added, return_dict=False
        )[0]

    # -- trainable parts ------------------------------------------------------------------------------------------

    @staticmethod
    def part_of(key: str) -> str | None:
        """Which of :data:`PARTS` a state-dict key belongs to (``None`` for base weights that never train)."""
        if "lora_" in key:
            return "lora"
        if key.startswith(("reference_encoder.ref_tokens", "reference_encoder.head")):
            return "reference"
        if key.startswith("reference_encoder.mllm."):
            return "mllm"
        if key.startswith("unet.encoder_hid_proj.") or ".processor.to_k_ip." in key or ".processor.to_v_ip." in key:
            return "adapter"
        return None

    def parameters_of(self, parts: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
        wanted = set(parts)
        return [(k, p) for k, p in self.named_parameters() if self.part_of(k) in wanted]

    def set_trainable(self, parts: Iterable[str]) -> list[nn.Parameter]:
        """Freeze everything except ``parts``; the MLLM trunk runs without autograd unless "mllm" trains."""
        wanted = set(parts)
        unknown = wanted - set(PARTS)
        if unknown:
            raise UserError(f"unknown trainable part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
        self.requires_grad_(False)
        params = [p for _, p in self.parameters_of(wanted)]
        for p in params:
            p.requires_grad_(True)
        self.reference_encoder.freeze_trunk = "mllm" not in wanted
        return params

    def state_dict_of(self, parts: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = set(parts)
        return {k: v for k, v in self.state_dict().items() if self.part_of(k) in wanted}

    def save_checkpoint(self, out: str | Path, parts: Iterable[str], **extra: Any) -> Path:
        """Write ``parts`` as safetensors + ``easyref_config.json`` into ``out`` (see :func:`write_checkpoint`)."""
        return write_checkpoint(out, self.config, self.state_dict_of(parts), parts, **extra)

    def load_trained(self, checkpoint: str | Path, record: CheckpointConfig | None = None) -> CheckpointConfig:
        """Load a checkpoint's tensors; every tensor of its parts must be present with the right shape.

        ``record``: the checkpoint's :func:`read_checkpoint_config`, when the caller has it (read and verified once).
        """
        record = record or read_checkpoint_config(checkpoint)
        if "lora" in record.parts and record.model.lora_rank:
            self.add_lora(record.model.lora_rank)
        tensors = load_weights(Path(checkpoint) / CHECKPOINT_WEIGHTS)
        expected = self.state_dict_of(record.parts)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mismatched = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
        if missing or unexpected or mismatched:
            lines = [f"{checkpoint}: checkpoint does not fit this model (parts {', '.join(record.parts)})"]
            for label, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
            for k in mismatched[:10]:
                lines.append(
                    f"  shape mismatch {k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
                )
            lines.append("  check that --base names the base models it was trained on, and its model settings")
            raise UserError("\n".join(lines))
        self.load_state_dict(tensors, strict=False)
        return record


@contextmanager
def base_model_errors(what: str, path: str | Path) -> Iterator[None]:
    """A missing, truncated or damaged base-model weights file as one :class:`UserError` line naming the model."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} {path}: cannot be loaded ({first}); copy the base models again") from exc


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(
        f"{path}: cannot be read as safetensors ({exc}); the file is truncated or damaged: copy it again or point "
        "at another checkpoint"
    )


def check_weights(path: str | Path) -> None:
    """Read a safetensors file's header only (cheap): a truncated or damaged file fails here, before models load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise _unreadable(Path(path), exc) from exc


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a :class:`UserError` naming a truncated or damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise _unreadable(Path(path), exc) from exc


def write_checkpoint(
    out: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], parts: Iterable[str], **extra: Any
) -> Path:
    """The one writer of a trained checkpoint: the tensors of ``parts`` + ``easyref_config.json`` (with ``extra`` as
    its provenance; ``base=`` goes to its own field), through :class:`easyref.atomic.FolderWriter` (temp folder,
    fsync, ``checksums.sha256``, the previous ``out`` set aside until the new one is in place)."""
    out, parts = Path(out), sorted(set(parts))
    wanted = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if EasyRef.part_of(k) in parts}
    record = CheckpointConfig(model=config, parts=parts, base=extra.pop("base", {}), extra=extra)
    with atomic_folder(out, required=(CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG)) as writer:
        writer.save_tensors(CHECKPOINT_WEIGHTS, wanted)
        writer.write_text(CHECKPOINT_CONFIG, json.dumps(to_dict(record), indent=2, sort_keys=True) + "\n")
    return out


def read_checkpoint_config(checkpoint: str | Path) -> CheckpointConfig:
    """A checkpoint's ``easyref_config.json``, after its files were verified against ``checksums.sha256``.

    A save killed between the writer's two renames left the previous checkpoint beside ``checkpoint`` complete: it is
    renamed back first (:func:`easyref.atomic.restore_interrupted`).
    """
    path = Path(checkpoint)
    restore_interrupted(path)
    cfg_file, weights = path / CHECKPOINT_CONFIG, path / CHECKPOINT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise UserError(
            f"{path}: not an EasyRef checkpoint (expected {CHECKPOINT_CONFIG} and {CHECKPOINT_WEIGHTS}); pass the "
            "folder a training stage wrote with --out"
        )
    record = from_dict(CheckpointConfig, load_json_object(cfg_file), where=str(cfg_file))
    unknown = set(record.parts) - set(PARTS)
    if unknown:
        raise UserError(f"{cfg_file}: unknown part(s) {sorted(unknown)}")
    check_weights(weights)
    verify_folder(path, required=(CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG))
    return record


def load_model(
    sdxl: str | Path,
    mllm: str | Path,
    checkpoint: str | Path | None = None,
    config: ModelConfig | None = None,
    torch_dtype: torch.dtype | None = None,
) -> EasyRef:
    """Base models + (optionally) trained EasyRef parts. A checkpoint's own model config wins over ``config``."""
    record = read_checkpoint_config(checkpoint) if checkpoint is not None else None
    if record is not None:
        config = record.model
    config = copy.deepcopy(config or ModelConfig())
    lora_rank, config.lora_rank = config.lora_rank, 0  # LoRA is attached by load_trained, after the base weights
    model = EasyRef.from_base(sdxl, mllm, config, torch_dtype=torch_dtype)
    if checkpoint is not None:
        model.load_trained(checkpoint, record)
    elif lora_rank:
        model.add_lora(lora_rank)
    return model
