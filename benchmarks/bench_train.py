"""Training benchmarks on the tiny profile (CPU) or real models (GPU).

  python benchmarks/bench_train.py throughput  --base models/tiny --data data/split/train.parquet
      samples/s of `easyref train` under torchrun with 1 and 2 processes (median step, from MLflow)
  python benchmarks/bench_train.py aggregation --base models/tiny
      stage-1 step cost: reference tokens at the last MLLM layer with a frozen trunk (the paper's efficient
      aggregation) vs tokens at layer 0 with the whole MLLM trainable
  python benchmarks/bench_train.py learning    --base models/tiny --data data/split/train.parquet
      a short stage-1 run: training loss first vs last steps, then the held-in denoising loss with each sample's
      own group references vs another group's
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMALL = {"min_pixels": 4 * 28 * 28, "max_pixels": 9 * 28 * 28, "dropped_image_size": 56}


def throughput(args: argparse.Namespace) -> None:
    from mlflow.tracking import MlflowClient

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    results = {}
    for nproc in (1, 2):
        out = tmp / f"np{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "easyref.cli", "train", "--stage", "pretrain", "--base", args.base, "--data", args.data,
               "--image-root", args.image_root, "--out", str(out), "--max-steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--save-every", "0", "--preview-every", "-1",
               "--experiment", "bench-train"]
        if args.params:
            cmd += ["--params", args.params]
        env = os.environ | {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("bench-train").experiment_id],
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        values = [m.value for m in client.get_metric_history(run.info.run_id, "samples_per_s")][2:]
        results[nproc] = statistics.median(values)
        print(f"{nproc} process(es): {results[nproc]:.2f} samples/s (global batch {args.batch_size * nproc})")
    print(f"2-process / 1-process throughput: {results[2] / results[1]:.2f}x")


def _step_cost(base: Path, insertion_layer: int, parts: list[str], batch: int, reps: int) -> float:
    from PIL import Image

    from easyref.base_models import BaseModels
    from easyref.model import ModelConfig
    from easyref.train.build import build_model
    from easyref.train.config import TrainConfig
    from easyref.train.recipe import Conditioner, DiffusionObjective, step_generator

    config = TrainConfig(base=str(base), parts=parts, model=ModelConfig(insertion_layer=insertion_layer, **SMALL))
    model = build_model(config, None, base / "sdxl", base / "mllm")
    conditioner = Conditioner(BaseModels.load(base / "sdxl", base / "mllm", model.config), (0.0, 0.0, 0.0))
    params = model.set_trainable(parts)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    objective = DiffusionObjective(model)
    refs = [[Image.new("RGB", (96, 80), (40 * i, 80, 160)) for i in range(3)] for _ in range(batch)]
    data = {"references": refs, "target": torch.zeros(batch, 3, 64, 64), "caption": ["a red star"] * batch}
    cond = conditioner(data, step_generator(0, 0, 0, 0))
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        objective(cond).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
    print(f"  insertion_layer={insertion_layer:>3} parts={'+'.join(parts):<31} trainable={trainable:>9,} "
          f"step={statistics.median(times) * 1000:.1f} ms")
    return statistics.median(times)


def aggregation(args: argparse.Namespace) -> None:
    import json

    layers = json.loads((Path(args.base) / "mllm" / "config.json").read_text())
    layers = (layers.get("text_config") or layers)["num_hidden_layers"]
    torch.set_num_threads(args.threads)
    efficient = _step_cost(Path(args.base), -1, ["reference", "adapter"], args.batch_size, args.reps)
    full = _step_cost(Path(args.base), -layers, ["reference", "adapter", "mllm"], args.batch_size, args.reps)
    print(f"layer-0 + whole MLLM trainable / efficient aggregation step cost: {full / efficient:.2f}x")


def learning(args: argparse.Namespace) -> None:
    import pandas as pd

    from easyref.base_models import BaseModels
    from easyref.data.dataset import center_crop, to_tensor
    from easyref.model import ModelConfig, load_model
    from easyref.train.config import TrainConfig
    from easyref.train.loop import train
    from easyref.train.recipe import Conditioner, DiffusionObjective, step_generator

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_learning_"))
    config = TrainConfig(base=args.base, data=args.data, image_root=args.image_root, max_steps=args.steps,
                         batch_size=args.batch_size, save_every=0, preview_every=-1, lr=args.lr,
                         model=ModelConfig(num_tokens=16, **SMALL), experiment="bench-learning")
    result = train(config, out=out)
    k = max(1, min(20, len(result.losses) // 5))
    first, last = statistics.mean(result.losses[:k]), statistics.mean(result.losses[-k:])
    print(f"training loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f} ({(last / first - 1) * 100:+.1f}%)")

    base = Path(args.base)
    model = load_model(base / "sdxl", base / "mllm", checkpoint=result.final)
    cond = Conditioner(BaseModels.load(base / "sdxl", base / "mllm", model.config), (0, 0, 0))
    objective = DiffusionObjective(model).eval()
    root = Path(args.image_root)
    train_rows = pd.read_parquet(args.data)
    held_in = pd.read_parquet(Path(args.data).with_name("held_in.parquet"))
    from PIL import Image

    def refs_of(group: str) -> list:
        paths = train_rows[train_rows.group == group].path.tolist()[:4]
        return [Image.open(root / p).convert("RGB") for p in paths]

    groups = held_in.group.tolist()
    own, other = [], []
    with torch.no_grad():
        for i, row in enumerate(held_in.itertuples()):
            target = to_tensor(center_crop(Image.open(root / row.path).convert("RGB"), (64, 64))[0])[None]
            for refs, sink in ((refs_of(row.group), own), (refs_of(groups[(i + 1) % len(groups)]), other)):
                for draw in range(args.draws):  # same noise and timesteps for both reference sets
                    batch = {"references": [refs], "target": target, "caption": [row.caption]}
                    sink.append(float(objective(cond(batch, step_generator(123, i, draw, 0)))))
    print(f"held-in denoising loss ({len(held_in)} targets x {args.draws} draws): own references "
          f"{statistics.mean(own):.4f}, another group's {statistics.mean(other):.4f} "
          f"(own/other {statistics.mean(own) / statistics.mean(other):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "aggregation", "learning"])
    parser.add_argument("--base", default="models/tiny")
    parser.add_argument("--data", default="data/split/train.parquet")
    parser.add_argument("--image-root", default="data/ingested")
    parser.add_argument("--params", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    {"throughput": throughput, "aggregation": aggregation, "learning": learning}[args.what](args)


if __name__ == "__main__":
    main()
