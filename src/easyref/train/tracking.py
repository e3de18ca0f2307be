"""MLflow tracking for training: rank 0 logs, the other ranks get a no-op tracker.

The run records the flattened config as params, per-step metrics, tags (git commit, stage, world size, data
manifest hash), preview grids as artifacts and how many training captions were cut to the text encoders' 77 tokens
(``captions_truncated``). The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else
``sqlite:///mlflow.db``. A resumed job continues the MLflow run its checkpoint names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from easyref.captions import CaptionFit
from easyref.runs import end_stage_run, git_commit, start_stage_run

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from easyref.sampler import EasyRefSampler
    from easyref.train.config import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
__all__ = ["MlflowTracker", "NullTracker", "Previewer", "git_commit", "preview_grid", "record_caption_cuts"]


class NullTracker:
    """What non-zero ranks use: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Any, name: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run for one training stage (resumed by id after a restart), nested under the pipeline's run when
    the stage runs inside one (:mod:`easyref.runs`)."""

    def __init__(
        self, experiment: str, stage: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None
    ):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
        run = start_stage_run(stage, experiment, tags, run_id=run_id)
        if run_id is None:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, artifact_file=name)

    def finish(self, status: str = "FINISHED") -> None:
        end_stage_run(status)


def record_caption_cuts(tracker: NullTracker, captions: CaptionFit, env: Any, step: int) -> None:
    """Every rank: sum the training captions cut to the text encoders' length over the ranks; rank 0 logs the
    metrics ``captions_truncated`` and ``captions_encoded`` and prints one line if any were cut."""
    from easyref.train import distributed as D

    cut, seen = D.sum_counts([captions.cut, captions.seen], env)
    if env.is_main:
        tracker.log_metrics({"captions_truncated": cut, "captions_encoded": seen}, step=step)
        if cut:
            print(
                f"captions: {cut} of {seen} training captions were longer than the text encoders' {captions.limit} "
                f"tokens and were cut at the last whole word that fits (MLflow metric captions_truncated)"
            )


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def preview_grid(rows: list[tuple[list[Any], Any]], cell: int = 128, max_refs: int = 3) -> Any:
    """One row per sample: up to ``max_refs`` reference thumbnails, a gap, then the generated image."""
    from PIL import Image

    width = (max_refs + 1) * cell + cell // 4
    grid = Image.new("RGB", (width, max(1, len(rows)) * cell), (255, 255, 255))
    for r, (refs, generated) in enumerate(rows):
        for i, ref in enumerate(refs[:max_refs]):
            grid.paste(ref.convert("RGB").resize((cell, cell)), (i * cell, r * cell))
        grid.paste(generated.convert("RGB").resize((cell, cell)), (max_refs * cell + cell // 4, r * cell))
    return grid


class Previewer:
    """Samples a few fixed reference groups with the library's DDIM sampler and logs one grid per call."""

    def __init__(self, sampler: EasyRefSampler, dataset: Dataset, config: TrainConfig):
        count = min(config.preview_samples, len(dataset))
        items = [dataset[i] for i in range(count)]
        self.refs = [list(s["references"]) for s in items]
        self.captions = [str(s["caption"]) for s in items]
        self.sampler, self.config = sampler, config
        self.size = int(items[0]["target"].shape[-1]) if items else None

    def __call__(self, tracker: NullTracker, step: int, dtype: torch.dtype | None) -> None:
        from easyref.train.recipe import autocast_context

        if not self.refs:
            return
        with autocast_context(self.sampler.device, dtype):
            images = self.sampler(
                self.captions,
                self.refs,
                num_inference_steps=self.config.preview_steps,
                generator=self.config.seed,
                height=self.size,
                width=self.size,
                progress=False,
            )
        grid = preview_grid(list(zip(self.refs, images, strict=True)))
        tracker.log_image(grid, f"previews/step_{step:08d}.png")
