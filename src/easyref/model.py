"""The EasyRef model: a Qwen2-VL reference encoder, a condition projector and decoupled cross-attention in SDXL.

* :class:`ReferenceProcessor` turns groups of reference images plus captions into one Qwen2-VL user turn each.
* :class:`ReferenceEncoder` runs the Qwen2-VL trunk over that context, appends ``num_tokens`` learnable reference
  tokens at the input of the insertion layer and returns their final hidden states: the group representation.
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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from easyref.atomic import atomic_folder, restore_interrupted, verify_folder
from easyref.config import from_dict, load_json_object, to_dict
from easyref.errors import UserError

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from PIL import Image

DEFAULT_INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, capturing the essence and details described "
    "in this prompt:\n{caption}"
)
CHECKPOINT_WEIGHTS = "easyref.safetensors"
CHECKPOINT_CONFIG = "easyref_config.json"

# Named groups of tensors of :class:`EasyRef`. A checkpoint stores the parts a stage trained.
PARTS = ("reference", "adapter", "mllm", "lora")
AGGREGATIONS = ("tokens", "mean", "concat")


@dataclass(kw_only=True)
class ModelConfig:
    """How EasyRef is wired onto its base models (the paper, arXiv 2412.09618, section 3)."""

    num_tokens: int = 64
    """Learnable reference tokens; the group representation has this many vectors (paper: 64; ablation 32/128)."""
    insertion_layer: int = -1
    """Decoder layer (negative index) at whose input the reference tokens are appended; it and all later layers
    form the trainable head, earlier layers the frozen trunk. -1 is the paper's efficient aggregation."""
    instruction: str = DEFAULT_INSTRUCTION
    """The MLLM text after the reference images; ``{caption}`` is replaced by the caption."""
    min_pixels: int = 121 * 28 * 28
    """Smallest area a reference is resized to (Qwen2-VL ``min_pixels``); 121 merged visual tokens."""
    max_pixels: int = 145 * 28 * 28
    """Largest area a reference is resized to (Qwen2-VL ``max_pixels``); 145 merged visual tokens."""
    max_references: int = 28
    """Most reference images read per sample; more raise an error."""
    dropped_image_size: int = 336
    """Side of the black image that replaces the references when they are dropped (CFG and the unconditional
    branch)."""
    adapter_scale: float = 1.0
    """Weight of the reference attention: out = attn(text) + scale * attn(references)."""
    lora_rank: int = 0
    """Rank of the UNet LoRA on attention q, k, v, out (0 = none; stages 2-3 use 128)."""
    token_init_std: float = 0.1
    """Reference tokens are initialised as ``token_init_std * randn``."""
    aggregation: str = "tokens"
    """How a group becomes one representation (the paper's Table 5 ablation): ``tokens`` = all references in one
    MLLM turn, read by the reference tokens (the paper's); ``mean`` = each reference encoded alone (one turn per
    image with the caption) and the per-image reference-token outputs averaged; ``concat`` = those per-image outputs
    concatenated (``num_tokens`` x group size vectors)."""

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if self.insertion_layer >= 0:
            raise ValueError(f"insertion_layer must be negative (-1 = last layer), got {self.insertion_layer}")
        if "{caption}" not in self.instruction:
            raise ValueError("instruction must contain the placeholder {caption}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")


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


class ReferenceProcessor:
    """Builds Qwen2-VL inputs for groups of reference images and captions.

    Each sample becomes one user turn: every reference image, then ``instruction`` with the caption, rendered with
    the model's chat template and a generation prompt. Image placeholders are expanded to the number of merged
    visual tokens of each image, as ``Qwen2VLProcessor`` does; batches are left-padded so every context ends at the
    same position and the reference tokens can follow it. With ``aggregation`` ``mean`` or ``concat`` every image
    is a turn of its own (with the sample's caption) and ``group_sizes`` says how many turns each sample has.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, config: ModelConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_length = image_processor.merge_size**2

    @classmethod
    def from_pretrained(cls, path: str | Path, config: ModelConfig) -> ReferenceProcessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            path, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        return cls(tokenizer, image_processor, config)

    def dropped_image(self) -> Image.Image:
        """The input that stands for 'no references': one black image."""
        from PIL import Image

        side = self.config.dropped_image_size
        return Image.new("RGB", (side, side))

    def prompt(self, num_images: int, caption: str) -> str:
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.config.instruction.format(caption=caption)})
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(
        self, references: Sequence[Sequence[Image.Image] | None], captions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """``references[i]`` is sample i's list of PIL images (``None`` or empty = dropped: one black image)."""
        texts, vision, sizes = self.expand(references, captions)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        input_ids = enc["input_ids"]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }
        if self.config.aggregation != "tokens":
            inputs["group_sizes"] = torch.tensor(sizes)
        return inputs

    def expand(
        self, references: Sequence[Sequence[Image.Image] | None], captions: Sequence[str]
    ) -> tuple[list[str], dict[str, torch.Tensor], list[int]]:
        """The chat-templated text of each MLLM turn with its image placeholders expanded to the images' visual
        token counts, the images' pixel values and grids, and the number of images of each sample."""
        if len(references) != len(captions):
            raise ValueError(f"{len(references)} reference groups but {len(captions)} captions")
        groups = [list(g) if g else [self.dropped_image()] for g in references]
        for i, g in enumerate(groups):
            if len(g) > self.config.max_references:
                raise UserError(
                    f"sample {i} has {len(g)} reference images; at most {self.config.max_references} "
                    "(model.max_references) are supported"
                )
        sizes = [len(g) for g in groups]
        if self.config.aggregation != "tokens":  # one turn per image, each with its sample's caption
            captions = [c for c, n in zip(captions, sizes, strict=True) for _ in range(n)]
            groups = [[img] for g in groups for img in g]
        flat = [img.convert("RGB") for g in groups for img in g]
        vision = self.image_processor(images=flat, return_tensors="pt")
        tokens_per_image = (vision["image_grid_thw"].prod(-1) // self.merge_length).tolist()
        texts, k = [], 0
        for g, caption in zip(groups, captions, strict=True):
            pieces = self.prompt(len(g), caption).split(self.image_token)
            text = pieces[0]
            for piece in pieces[1:]:
                text += self.image_token * tokens_per_image[k] + piece
                k += 1
            texts.append(text)
        return texts, vision, sizes


class ReferenceEncoder(nn.Module):
    """Qwen2-VL over the multimodal context, with learnable reference tokens appended at the insertion layer.

    The decoder layers before the insertion layer (and the vision tower and embeddings) form the *trunk*; the
    insertion layer and those after it, plus the final norm, form the trainable *head*, moved out of the base
    model so the trunk's forward stops before them. The head starts from the base weights and is trained on its
    own. With ``freeze_trunk`` the trunk runs under ``torch.no_grad()`` (stage 1); unfrozen, it trains too
    (stages 2-3).
    """

    def __init__(self, mllm: nn.Module, config: ModelConfig):
        super().__init__()
        core = mllm.model if hasattr(mllm, "lm_head") else mllm  # Qwen2VLForConditionalGeneration -> Qwen2VLModel
        language_model = core.language_model
        num_layers = len(language_model.layers)
        head_len = -config.insertion_layer
        if head_len > num_layers:
            raise UserError(
                f"model.insertion_layer={config.insertion_layer} but the MLLM has only {num_layers} decoder layers"
            )
        self.head = nn.ModuleList(language_model.layers[num_layers - head_len :])
        self.head_norm = language_model.norm
        language_model.layers = nn.ModuleList(language_model.layers[: num_layers - head_len])
        language_model.norm = nn.Identity()
        self.mllm = core
        self.text_config = language_model.config
        hidden = self.text_config.hidden_size
        self.ref_tokens = nn.Parameter(config.token_init_std * torch.randn(config.num_tokens, hidden))
        self.freeze_trunk = True
        self.aggregation = config.aggregation

    @property
    def hidden_size(self) -> int:
        return self.ref_tokens.shape[-1]

    def trunk(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context hidden states at the insertion layer and their M-RoPE positions ``(3, B, L)``."""
        position_ids, _ = self.mllm.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        hidden = self.mllm(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=position_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            use_cache=False,
        ).last_hidden_state
        return hidden, position_ids

    def forward(self, inputs: dict[str, torch.Tensor], return_context: bool = False) -> torch.Tensor:
        """``(B, tokens, hidden)`` group representations (with ``return_context``: the whole final sequence of each
        MLLM turn). ``tokens`` is ``num_tokens``, except with ``concat``: ``num_tokens`` x group size (see
        :func:`common_length` for a batch of different group sizes)."""
        from transformers.masking_utils import create_causal_mask

        if self.freeze_trunk:
            with torch.no_grad():
                context, position_ids = self.trunk(inputs)
        else:
            context, position_ids = self.trunk(inputs)
        batch, length, _ = context.shape
        n = self.ref_tokens.shape[0]
        tokens = self.ref_tokens.to(context.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden = torch.cat([context, tokens], dim=1)
        # The tokens continue the text positions after the last context position, on all three M-RoPE axes.
        start = position_ids.amax(dim=(0, 2)) + 1  # (B,)
        token_pos = start[None, :, None] + torch.arange(n, device=start.device)[None, None, :]
        positions = torch.cat([position_ids, token_pos.expand(3, -1, -1)], dim=2)
        attention_mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, n)], dim=1)
        mask = create_causal_mask(
            config=self.text_config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None
        )
        rotary = self.mllm.language_model.rotary_emb(hidden, positions)
        for layer in self.head:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary)
        hidden = self.head_norm(hidden)
        if return_context:
            return hidden
        return self.aggregate(hidden[:, length:], inputs.get("group_sizes"))

    def aggregate(self, states: torch.Tensor, group_sizes: torch.Tensor | None) -> torch.Tensor:
        """Per-turn reference-token outputs ``(turns, num_tokens, hidden)`` -> one representation per sample."""
        if group_sizes is None:
            return states
        per_sample = states.split(group_sizes.tolist())
        if self.aggregation == "mean":
            return torch.stack([s.mean(dim=0) for s in per_sample])
        return torch.cat(common_length([s.reshape(1, -1, s.shape[-1]) for s in per_sample]))


def common_length(states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(B_i, T_i, D)`` reference states brought to one token count, for one batch of the UNet.

    Each sample's token set is tiled to the least common multiple of the ``T_i``: attention over a token set
    repeated ``k`` times equals attention over the set, so this is exact (the reference branch has no key mask).
    Should that multiple exceed 8 x the longest, the sets are tiled and cut at the longest instead (approximate).
    """
    import math

    lengths = [s.shape[1] for s in states]
    target = math.lcm(*lengths)
    if target > 8 * max(lengths):
        target = max(lengths)
    return [s.repeat(1, -(-target // s.shape[1]), 1)[:, :target] for s in states]


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
