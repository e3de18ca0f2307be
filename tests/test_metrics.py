"""CLIP-I / CLIP-T / DINO-I on constructed cases, the target-embedding cache and the confidence intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from easyref.metrics import ClipEmbedder, DinoEmbedder, EmbeddingCache, cosine, mean_ci
from tests.conftest import make_group


@pytest.fixture(scope="module")
def clip(tiny_models) -> ClipEmbedder:
    return ClipEmbedder.from_pretrained(str(tiny_models / "clip"), batch_size=2)


@pytest.fixture(scope="module")
def dino(tiny_models) -> DinoEmbedder:
    return DinoEmbedder.from_pretrained(str(tiny_models / "dino"), batch_size=2)


def test_identical_images_score_one_and_different_images_less(clip, dino):
    a, b = make_group(1, 1)[0], make_group(7, 1)[0]
    for embedder in (clip, dino):
        emb = embedder.embed_images([a, a.copy(), b])
        assert emb.shape[0] == 3
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        same = cosine(emb[0:1], emb[1:2]).item()
        other = cosine(emb[0:1], emb[2:3]).item()
        assert same == pytest.approx(1.0, abs=1e-5)
        assert other < same - 1e-4


def test_batching_does_not_change_embeddings(tiny_models, clip):
    images = make_group(3, 5)
    one_by_one = ClipEmbedder.from_pretrained(str(tiny_models / "clip"), batch_size=1).embed_images(images)
    torch.testing.assert_close(clip.embed_images(images), one_by_one, atol=1e-5, rtol=1e-5)


def test_clip_t_compares_image_and_caption_embeddings(clip):
    images = make_group(2, 2)
    text = clip.embed_texts(["a red star", "a blue circle"])
    assert text.shape == (2, clip.model.config.projection_dim)
    scores = cosine(clip.embed_images(images), text)
    assert scores.shape == (2,) and bool(((scores >= -1) & (scores <= 1)).all())


def test_mean_ci_matches_students_t():
    s = mean_ci([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0 and s.count == 3
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2}
    wide, narrow = mean_ci([0.0, 1.0] * 5), mean_ci([0.0, 1.0] * 50)
    assert narrow.half_width < wide.half_width
    assert mean_ci([0.5, 0.5, 0.5]).half_width == 0.0


def test_mean_ci_edge_cases():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    assert math.isnan(mean_ci([]).mean)
    assert mean_ci([1.0, float("nan"), 3.0]).count == 2


def test_target_cache_embeds_each_file_once_and_persists(tmp_path, clip):
    from easyref.evaluate.samples import load_image

    paths = []
    for i, image in enumerate(make_group(4, 3)):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    cache = EmbeddingCache(tmp_path / "cache.safetensors")
    first = cache.embed_files(clip, paths, load_image)
    assert (cache.hits, cache.misses) == (0, 3)
    again = cache.embed_files(clip, paths[::-1], load_image)
    assert (cache.hits, cache.misses) == (3, 3)
    torch.testing.assert_close(again, first.flip(0))
    cache.save()
    reloaded = EmbeddingCache(tmp_path / "cache.safetensors")
    torch.testing.assert_close(reloaded.embed_files(clip, paths, load_image), first)
    assert reloaded.misses == 0


def test_unloadable_metric_model_is_a_user_error(tmp_path):
    from easyref.errors import UserError

    with pytest.raises(UserError, match="evaluate.metrics.clip"):
        ClipEmbedder.from_pretrained(str(tmp_path / "missing"))


def test_named_colour_tells_every_demo_colour_and_orange_from_brown():
    """The colour_match metric's classifier names the subject colour of drawn demo images (all 8, patterns
    included; one hue for orange and brown), and no colour for a plain background."""
    from PIL import Image

    from easyref.data.demo import BACKGROUNDS, COLOURS
    from easyref.metrics import named_colour
    from easyref.tiny.data import CHECK_SEED, draw

    drawn = draw(CHECK_SEED, 1)
    grounds = list(BACKGROUNDS.values())
    named = [named_colour(d.image, COLOURS, grounds) for d in drawn]
    assert named == [d.subject.colour for d in drawn]
    assert named_colour(Image.new("RGB", (64, 64), BACKGROUNDS["cream"]), COLOURS, grounds) is None


def test_params_palette_is_the_demo_data_palette():
    from easyref.config import load_yaml
    from easyref.data.demo import BACKGROUNDS, COLOURS

    params = load_yaml(Path(__file__).resolve().parent.parent / "params.yaml")["evaluate"]
    assert {k: tuple(v) for k, v in params["palette"].items()} == COLOURS
    assert [tuple(v) for v in params["palette_backgrounds"]] == list(BACKGROUNDS.values())
