"""Pretrain the tiny MLLM: a Qwen2-VL that has learned to see, as Qwen2-VL-2B has before EasyRef trains on it.

The real EasyRef reads its references with a pretrained vision-language model; a random tiny Qwen2-VL understands
nothing, so its hidden states carry little of what the references show. This module trains the tiny one on
demo-style images drawn with other seeds than the demo's, in two stages as Qwen2-VL was made: its vision tower
first learns contrastively (:mod:`easyref.tiny.mllm_vision`: Qwen2-VL's ViT starts from a CLIP-trained one), then
the whole model (vision tower at a tenth of the learning rate, merger and language model) learns next-token loss
on the answer, on three kinds of user turn, each a chat-templated turn as Qwen2-VL is instructed:

* ``Describe the image.`` -> the image's caption up to the background, naming size, pattern, colour, shape, place;
* ``What do these images have in common?`` with 2-4 images of one subject -> ``a striped blue circle``;
* a question about one attribute (colour, shape or pattern) -> ``blue``.

:func:`check` asks it to describe held-back images (greedy decoding) and counts how often the caption it writes
names the right colour, shape and pattern.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.tiny import assets
from easyref.tiny.common import (
    PretrainConfig,
    add_config_arguments,
    config_from_args,
    last100,
    part_fingerprint,
    run_record,
)
from easyref.tiny.optim import take_step, warmed_adamw

if TYPE_CHECKING:
    import torch

DESCRIBE = "Describe the image."
COMMON = "What do these images have in common?"
ATTRIBUTES = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "pattern": "What pattern does the shape have?",
}


@dataclass(kw_only=True)
class MLLMPretrainConfig(PretrainConfig):
    """How the tiny MLLM is pretrained (the defaults made the packaged one)."""

    data_seed: int = 3001
    per_subject: int = 16
    patterns: str = "all"
    steps: int = 4000
    batch: int = 12
    warmup: int = 100
    """Steps of linear learning-rate warm-up."""
    min_pixels: int = 16 * 28 * 28
    """Image sizes as the tiny profile's EasyRef reads its references (params.yaml train.model)."""
    max_pixels: int = 25 * 28 * 28
    vision_steps: int = 8000
    """Steps of the vision tower's contrastive first stage (0: none, the tower starts random)."""
    vision_batch: int = 64
    """(image, text) pairs per step of the first stage."""
    vision_lr_scale: float = 0.1
    """The vision tower's learning rate in the second stage, as a share of ``lr`` (it already sees)."""


def _processor(folder: Path, config: MLLMPretrainConfig) -> Any:
    from easyref.model import ModelConfig, ReferenceProcessor

    return ReferenceProcessor.from_pretrained(
        folder, ModelConfig(instruction="{caption}", min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    )


class _MemoImageProcessor:
    """The image processor with each image's patches computed once (pretraining shows every image many times)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.merge_size = inner.merge_size
        self.cache: dict[bytes, tuple[Any, Any]] = {}

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import hashlib

        import torch

        parts = []
        for image in images:
            key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            if key not in self.cache:
                out = self.inner(images=[image], return_tensors=return_tensors)
                self.cache[key] = (out["pixel_values"], out["image_grid_thw"])
            parts.append(self.cache[key])
        return {"pixel_values": torch.cat([p for p, _ in parts]), "image_grid_thw": torch.cat([g for _, g in parts])}


def _turn(drawn: list[Any], by_subject: dict[Any, list[int]], index: int, generator: Any) -> tuple[list, str, str]:
    """One training turn around drawn image ``index``: (images, question, answer)."""
    import torch

    from easyref.data.demo import PATTERN_WORDS
    from easyref.tiny.data import describe

    item = drawn[index]
    kind = float(torch.rand(1, generator=generator))
    if kind < 0.4:  # the caption up to its background: subject, size and place
        return [item.image], DESCRIBE, item.full_caption.split(" on ")[0]
    if kind < 0.8:
        pool = by_subject[item.subject]
        count = int(torch.randint(2, 5, (1,), generator=generator))
        picks = torch.randperm(len(pool), generator=generator)[:count].tolist()
        return [drawn[pool[p]].image for p in picks], COMMON, describe(item.subject)
    attribute = list(ATTRIBUTES)[int(torch.randint(0, 3, (1,), generator=generator))]
    answer = {
        "colour": item.subject.colour,
        "shape": item.subject.shape,
        "pattern": PATTERN_WORDS[item.subject.pattern].strip() or "solid",
    }[attribute]
    return [item.image], ATTRIBUTES[attribute], answer


def _batch(processor: Any, turns: list[tuple[list, str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded training inputs; labels only on the answers (and their end-of-turn token)."""
    import torch

    tokenizer = processor.tokenizer
    texts, vision, _ = processor.expand([t[0] for t in turns], [t[1] for t in turns])
    ids, labels = [], []
    for text, (_, _, answer) in zip(texts, turns, strict=True):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    length = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids]),
        "labels": torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels]),
        "mm_token_type_ids": (input_ids == processor.image_token_id).int(),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def train_mllm(folder: Path, config: MLLMPretrainConfig) -> tuple[list[float], dict[str, Any]]:
    """Train the Qwen2-VL in ``folder`` (written by ``build.write_qwen2vl``) in place, both stages; the second
    stage's losses per step and the first stage's record (its last 100 steps' mean loss and its check)."""
    from transformers import Qwen2VLForConditionalGeneration

    from easyref.tiny import mllm_vision
    from easyref.tiny.data import draw

    drawn = draw(config.data_seed, config.per_subject, patterns=config.patterns)
    processor = _processor(folder, config)
    processor.image_processor = _MemoImageProcessor(processor.image_processor)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    model.train()
    vision: dict[str, Any] = {}
    if config.vision_steps > 0:
        vision_losses, pair = mllm_vision.train_vision_tower(
            model, processor.image_processor, drawn, seed=config.seed, steps=config.vision_steps,
            batch=config.vision_batch, lr=config.lr, warmup=config.warmup)
        vision = {"loss_last100": last100(vision_losses),
                  "check": mllm_vision.check(pair, patterns=config.patterns)}
    losses = _train_language(model, processor, drawn, config)
    model.eval().save_pretrained(folder)
    return losses, vision


def _train_language(model: Any, processor: Any, drawn: list[Any], config: MLLMPretrainConfig) -> list[float]:
    """The second stage: next-token loss on the answers of :func:`_turn`'s chat turns; losses per step."""
    import torch
    from tqdm.auto import tqdm

    by_subject: dict[Any, list[int]] = {}
    for i, d in enumerate(drawn):
        by_subject.setdefault(d.subject, []).append(i)
    tower = list(model.model.visual.parameters())
    ids = {id(p) for p in tower}
    groups = [{"params": tower, "lr": config.lr * config.vision_lr_scale},
              {"params": [p for p in model.parameters() if id(p) not in ids]}]
    generator = torch.Generator().manual_seed(config.seed)
    opt, warm = warmed_adamw(groups, config.lr, config.warmup)
    losses: list[float] = []
    for _ in (bar := tqdm(range(config.steps), desc="mllm", dynamic_ncols=True)):
        picks = torch.randint(0, len(drawn), (config.batch,), generator=generator).tolist()
        loss = model(**_batch(processor, [_turn(drawn, by_subject, i, generator) for i in picks])).loss
        take_step(loss, opt, warm, losses, bar)
    return losses


def named(text: str, subject: Any) -> dict[str, bool]:
    """Which of the subject's colour, shape and pattern a generated caption names (and no other)."""
    from easyref.data.demo import COLOURS, PATTERN_WORDS, SHAPES

    words = text.replace("-", " ").split()
    colours = {c for c in COLOURS if c in words}
    shapes = {s for s in SHAPES if s in words}
    patterns = {p for p, w in PATTERN_WORDS.items() if w and w.strip().split("-")[0] in words}
    return {
        "colour": colours == {subject.colour},
        "shape": shapes == {subject.shape},
        "pattern": patterns == ({subject.pattern} - {"solid"}),
    }


def describe_images(folder: Path, images: list[Any], config: MLLMPretrainConfig, batch: int = 16) -> list[str]:
    """Greedy answers of the MLLM in ``folder`` to ``Describe the image.`` for each image."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    processor = _processor(folder, config)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    answers = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        inputs = processor([[im] for im in chunk], [DESCRIBE] * len(chunk))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=48, do_sample=False,
                                 eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        answers += processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def check(folder: Path, config: MLLMPretrainConfig | None = None, per_subject: int = 0) -> dict[str, Any]:
    """On held-back images of the subjects it learnt (``config.patterns``): the share of generated captions that
    name the right colour, shape, pattern, all three (``per_subject`` 0 draws 96 images whichever the subjects)."""
    from easyref.data.demo import catalogue
    from easyref.tiny.data import CHECK_SEED, draw

    config = config or MLLMPretrainConfig()
    drawn = draw(CHECK_SEED, per_subject or max(1, 96 // len(catalogue(config.patterns))), patterns=config.patterns)
    answers = describe_images(folder, [d.image for d in drawn], config)
    hits = [named(a, d.subject) for a, d in zip(answers, drawn, strict=True)]
    rates = {k: sum(h[k] for h in hits) / len(hits) for k in ("colour", "shape", "pattern")}
    rates["all"] = sum(all(h.values()) for h in hits) / len(hits)
    return {**rates, "examples": [f"{d.subject.describe()} -> {a}" for d, a in zip(drawn[::17], answers[::17], strict=True)]}


def fingerprint() -> str:
    """sha256 of the code that shapes the MLLM: this module, its vision stage, the chat format EasyRef reads
    references in (``easyref.model``) and what every part shares."""
    from easyref import model as model_module
    from easyref.tiny import mllm_vision

    return part_fingerprint(__file__, mllm_vision.__file__, model_module.__file__)


def pretrain_mllm(out: Path, config: MLLMPretrainConfig) -> dict[str, Any]:
    """Write a random tiny Qwen2-VL, train it, check it, and publish it to ``out``."""
    import torch

    from easyref.tiny import build

    torch.set_num_threads(config.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mllm"
        build.write_qwen2vl(folder, config.seed)
        losses, vision = train_mllm(folder, config)
        assets.forget_source_path(folder / "config.json")
        record = run_record("mllm", config, fingerprint(), losses, started, vision_stage=vision)
        return assets.publish(folder, out, {**record, "check": check(folder, config)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, MLLMPretrainConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(MLLMPretrainConfig(), args)
    out = args.out or assets.asset("mllm")
    manifest = pretrain_mllm(out, config)
    print(f"pretrain-tiny mllm: wrote {out} in {manifest['seconds']} s; check {manifest['check']}")
    return 0
