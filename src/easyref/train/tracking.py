"""MLflow tracking for training: rank 0 logs, the other ranks get a no-op tracker.

The run records the flattened config as params, per-step metrics, tags (git commit, stage, world size, data
manifest hash) and preview grids as artifacts. The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else
``sqlite:///mlflow.db``. A resumed job continues the MLflow run its checkpoint names.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from easyref.sampler import EasyRefSampler
    from easyref.train.config import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


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
    """One MLflow run for one training stage (resumed by id after a restart)."""

    def __init__(
        self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None
    ):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
        if run_id is None:
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name, tags=tags)
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        else:
            run = mlflow.start_run(run_id=run_id)
            mlflow.set_tags(tags)
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, image: Any, name: str) -> None:
        self.mlflow.log_image(image, artifact_file=name)

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


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
