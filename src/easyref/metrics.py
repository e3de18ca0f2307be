"""Image-similarity metrics of the EasyRef paper: CLIP-I, CLIP-T and DINO-I (their intervals: :mod:`easyref.stats`).

* CLIP-I: cosine similarity between the CLIP image embeddings of a generated image and its target image.
* CLIP-T: cosine similarity between the CLIP image embedding of a generated image and the CLIP text embedding of
  its caption.
* DINO-I: cosine similarity between the DINOv2 CLS embeddings of a generated image and its target image.

The embedding models are loaded with ``from_pretrained`` from a hub id or a folder (``openai/clip-vit-large-patch14``
and ``facebook/dinov2-small`` in the real profile, the tiny models in tests), images are embedded in batches and
target embeddings can be kept in an :class:`EmbeddingCache` keyed by the image file's SHA-256, so evaluating a
second checkpoint on the same split embeds only the generated images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from easyref.errors import UserError
from easyref.stats import Summary as Summary  # re-exported: the interval types live in easyref.stats
from easyref.stats import mean_ci as mean_ci

if TYPE_CHECKING:
    from PIL import Image


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and a ``BaseModelOutputWithPooling`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_image_processor(path: str) -> Any:
    """The model's image processor, PIL backend (the torchvision one is never used)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except OSError as exc:
        raise UserError(f"cannot load an image processor from {path!r}: {exc}") from exc


class ImageEmbedder:
    """Batched, L2-normalised image embeddings from a ``transformers`` vision model."""

    name: str

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = 32, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(N, D)`` unit-length float32 embeddings on the CPU."""
        chunks = []
        for batch in _batches(list(images), self.batch_size):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
            chunks.append(torch.nn.functional.normalize(self._embed_batch(pixels).float(), dim=-1).cpu())
        if not chunks:
            return torch.empty(0, 0)
        return torch.cat(chunks)


class ClipEmbedder(ImageEmbedder):
    """CLIP image and text towers (projected embeddings), for CLIP-I and CLIP-T."""

    name = "clip"

    def __init__(
        self, model: torch.nn.Module, processor: Any, tokenizer: Any, batch_size: int = 32, device: str = "cpu"
    ):
        super().__init__(model, processor, batch_size, device)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 32, device: str = "cpu") -> ClipEmbedder:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise UserError(f"cannot load the CLIP metric model from {path!r} (evaluate.metrics.clip): {exc}") from exc
        return cls(model, _load_image_processor(path), tokenizer, batch_size, device)

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` unit-length text embeddings; captions longer than CLIP's context are truncated."""
        chunks = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt").to(self.device)
            chunks.append(
                torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1).cpu()
            )
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


class DinoEmbedder(ImageEmbedder):
    """DINOv2 CLS embeddings (after the final layer norm), for DINO-I."""

    name = "dino"

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 32, device: str = "cpu") -> DinoEmbedder:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise UserError(f"cannot load the DINO metric model from {path!r} (evaluate.metrics.dino): {exc}") from exc
        return cls(model, _load_image_processor(path), batch_size, device)

    def _embed_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """Embeddings of image files keyed by ``(embedder, SHA-256 of the file)``, optionally persisted.

    The file is a safetensors dict; a corrupt or foreign file is ignored (and rewritten on :meth:`save`), since it
    only saves time.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        if self.path and self.path.is_file():
            from safetensors.torch import load_file

            try:
                self.entries = load_file(self.path)
            except Exception:  # noqa: BLE001 - a cache that cannot be read is rebuilt
                self.entries = {}

    def embed_files(
        self, embedder: ImageEmbedder, paths: Sequence[Path], load: Callable[[Path], Image.Image]
    ) -> torch.Tensor:
        """``(N, D)`` embeddings of the image files ``paths``, computing only those not cached."""
        keys = [f"{embedder.name}:{sha256_bytes(Path(p).read_bytes())}" for p in paths]
        missing = {k: p for k, p in zip(keys, paths, strict=True) if k not in self.entries}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = embedder.embed_images([load(p) for p in missing.values()])
            self.entries.update({k: e.clone() for k, e in zip(missing, fresh, strict=True)})
        if not keys:
            return torch.empty(0, 0)
        return torch.stack([self.entries[k] for k in keys])

    def save(self) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.entries.items()}, tmp)
        tmp.replace(self.path)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``(N, D)`` tensors."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


HUE_BINS = 12
"""Hue bins of :func:`hue_histogram` (30 degrees each)."""


def hue_histogram(image: Image.Image, min_saturation: float = 0.35, min_value: float = 0.2, side: int = 64) -> Any:
    """Normalised histogram of the hues of an image's saturated pixels (all zeros if it has none).

    Pale backgrounds and dark shading have low saturation or value and drop out, so what remains is the colour of
    the subject: the part of an image that a colour-free caption does not describe.
    """
    import numpy as np

    hsv = np.asarray(image.convert("RGB").resize((side, side)).convert("HSV"), dtype=np.float32) / 255.0
    keep = (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)
    bins = np.minimum((hsv[..., 0][keep] * HUE_BINS).astype(np.int64), HUE_BINS - 1)
    hist = np.bincount(bins, minlength=HUE_BINS).astype(np.float64)
    return hist / hist.sum() if hist.sum() else hist


def colour_similarity(generated: Image.Image, target: Image.Image) -> float:
    """Histogram intersection of the two images' saturated-pixel hues, in [0, 1]: 1 = the same colours.

    An interpretable companion to CLIP-I and DINO-I: it answers only "is the subject the target's colour?".
    """
    import numpy as np

    return float(np.minimum(hue_histogram(generated), hue_histogram(target)).sum())


def named_colour(image: Image.Image, palette: dict[str, tuple[int, int, int]], backgrounds: Sequence[tuple[int, int, int]],
                 *, side: int = 64, min_share: float = 0.02) -> str | None:
    """The palette colour an image's subject is drawn in, or ``None`` when no subject stands out.

    Pixels close to one of the ``backgrounds`` drop out; every other pixel votes for the palette colour nearest to
    it or to that colour's pattern shade (the demo draws patterns in 0.45 x the colour). Unlike a hue histogram this
    tells orange from brown (one hue, two brightnesses). ``None`` when under ``min_share`` of the pixels vote.
    """
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32).reshape(-1, 3)
    ground = np.asarray(backgrounds, dtype=np.float32).reshape(-1, 3)
    foreground = pixels
    if len(ground):
        foreground = pixels[np.linalg.norm(pixels[:, None] - ground[None], axis=-1).min(-1) > 40]
    if len(foreground) < min_share * len(pixels):
        return None
    names = list(palette)
    colours = np.asarray([palette[n] for n in names], dtype=np.float32)
    anchors = np.concatenate([colours, 0.45 * colours])  # colour, then its shade
    nearest = np.linalg.norm(foreground[:, None] - anchors[None], axis=-1).argmin(-1) % len(names)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]
