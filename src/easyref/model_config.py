"""How EasyRef is wired onto its base models: :class:`ModelConfig` (a leaf: no torch, no project import)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INSTRUCTION = (
    "Visualize a scene that closely resembles the provided images, capturing the essence and details described "
    "in this prompt:\n{caption}"
)
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
