"""The MLLM side of EasyRef: Qwen2-VL inputs for groups of references, and the reference encoder.

* :class:`ReferenceProcessor` turns groups of reference images plus captions into one Qwen2-VL user turn each.
* :class:`ReferenceEncoder` runs the Qwen2-VL trunk over that context, appends ``num_tokens`` learnable reference
  tokens at the input of the insertion layer and returns their final hidden states: the group representation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from easyref.errors import UserError
from easyref.model_config import ModelConfig

if TYPE_CHECKING:
    from PIL import Image


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
