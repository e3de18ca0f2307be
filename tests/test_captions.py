"""Captions longer than the SDXL text encoders read are cut on purpose, counted, and logged once, not per caption."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from components.testing import mlflow_store
from easyref.captions import CaptionFit
from tests.conftest import make_group

LONG = "a red square drawn with a thin pen on grey paper beside a blue circle and a green triangle " * 3


@pytest.fixture(scope="module")
def sampler(tiny_models):
    from easyref.model import ModelConfig
    from easyref.sampler import EasyRefSampler
    from tests.conftest import SMALL_PIXELS

    torch.manual_seed(0)
    return EasyRefSampler.from_pretrained(
        tiny_models / "sdxl", tiny_models / "mllm", model_config=ModelConfig(num_tokens=8, **SMALL_PIXELS)
    )


@contextmanager
def library_warnings() -> Iterator[list[str]]:
    """Every warning diffusers and transformers log (their loggers do not propagate to the root) or raise."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield seen
        seen += [str(w.message) for w in raised]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_a_long_caption_is_cut_at_a_word_and_fits_both_tokenizers(sampler):
    fit = CaptionFit.for_pipeline(sampler.pipe)
    assert fit.limit == 77 and len(fit.tokenizers) == 2
    short, cut = fit(["a cat", LONG])
    assert short == "a cat" and fit.fits(cut) and not fit.fits(LONG)
    assert LONG.startswith(cut) and LONG[len(cut)] == " "  # whole words only
    assert not fit.fits(LONG[: len(cut) + len(LONG[len(cut) :].split()[0]) + 1])  # the next word would not fit
    assert (fit.cut, fit.seen) == (1, 2)
    assert fit.summary().startswith("captions: 1 of 2 were longer than the text encoders' 77 tokens")
    word = "x" * 200  # no space to cut at: cut inside the word
    assert fit.fits(fit.fit(word)) and word.startswith(fit.fit(word)) and len(fit.fit(word)) > 10


def test_generating_with_a_long_caption_logs_no_truncation_warning_and_counts_it(sampler):
    fit = CaptionFit.shared(sampler.pipe)
    before = fit.cut
    with library_warnings() as seen:
        sampler([LONG], [make_group(1)], generator=0, num_inference_steps=2, output_type="np", progress=False)
    assert not [m for m in seen if "truncated" in m or "longer than the specified maximum" in m], seen
    assert fit.cut == before + 1


def test_the_encoders_see_the_words_that_fit(sampler):
    """What the encoders get for the long caption is exactly its cut, not something else."""
    pipe, fit = sampler.pipe, CaptionFit.for_pipeline(sampler.pipe)
    ours = pipe.encode_prompt(prompt=fit([LONG]), device="cpu", do_classifier_free_guidance=False)[0]
    cut = pipe.encode_prompt(prompt=[fit.fit(LONG)], device="cpu", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(ours, cut)


def test_training_records_the_number_of_cut_captions(tiny_models, tmp_path, monkeypatch):
    """record_caption_cuts logs captions_truncated / captions_encoded in the stage's (real sqlite) MLflow run."""
    from mlflow import MlflowClient

    from easyref.train.distributed import DistEnv
    from easyref.train.tracking import MlflowTracker, record_caption_cuts

    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("EASYREF_PIPELINE_RUN", raising=False)
    from transformers import CLIPTokenizer

    fit = CaptionFit([CLIPTokenizer.from_pretrained(tiny_models / "sdxl" / "tokenizer")])
    fit(["short", LONG, LONG, ""])
    tracker = MlflowTracker("easyref-train", "pretrain", {"lr": 1e-4}, {})
    record_caption_cuts(tracker, fit, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), 5)
    tracker.finish()
    metrics = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert metrics["captions_truncated"] == 2 and metrics["captions_encoded"] == 4


def test_generate_says_once_that_a_long_prompt_was_cut(tiny_models, tmp_path, capsys):
    from easyref.cli import main

    refs = []
    for i, im in enumerate(make_group(5, 2)):
        im.save(tmp_path / f"ref{i}.png")
        refs += ["--ref", str(tmp_path / f"ref{i}.png")]
    args = ["generate", "--base", str(tiny_models), *refs, "--steps", "2", "--out", str(tmp_path / "x.png")]
    with library_warnings() as seen:
        assert main([*args, "--prompt", LONG]) == 0
    assert not [m for m in seen if "truncated" in m or "longer than the specified maximum" in m], seen
    notes = [line for line in capsys.readouterr().err.splitlines() if "--prompt is longer" in line]
    assert len(notes) == 1 and "77 tokens" in notes[0]
    assert main([*args, "--prompt", "a ball"]) == 0
    assert "--prompt is longer" not in capsys.readouterr().err
