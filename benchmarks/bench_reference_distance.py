"""After ``make demo``: how close each method's images are to their group's references and to the target.

Run:  .venv/bin/python benchmarks/bench_reference_distance.py [--demo .] [--threads 2]

Reads the demo's ``outputs/eval/samples.parquet`` (every generated image), ``data/split/{held_out,held_in}.parquet``
and the tiny judges in ``models/tiny/{clip,dino}``. For every method and section it prints the mean cosine of each
image to its group's references and to its target (the metrics' CLIP and DINOv2 embeddings) and the per-sample
difference references - target with its 95% interval. A method that copies its references' layout would be closer
to them than the others are, and its gap would be higher. Nothing is asserted.
"""

from __future__ import annotations

import dataclasses

import torch
from demo_outputs import demo_arguments, demo_outputs, demo_samples
from PIL import Image


def main() -> None:
    args = demo_arguments(__doc__)
    from easyref.evaluate.samples import ImageStore
    from easyref.evaluate.scoring import load_embedders
    from easyref.metrics import cosine, mean_ci

    root = args.demo
    config, table = demo_outputs(root)
    judges = root / "models" / "tiny"
    config = dataclasses.replace(config, metrics=dataclasses.replace(
        config.metrics, clip=str(judges / "clip"), dino=str(judges / "dino")))
    embedders = dict(zip(("CLIP", "DINO"), load_embedders(config, "cpu"), strict=True))
    store = ImageStore()
    for section in ("held_out", "held_in"):
        samples = demo_samples(root, section)
        for judge, embedder in embedders.items():
            print(f"{section}, {judge}: method, mean cosine to the references, to the target, references - target")
            paths = sorted({p for s in samples.values() for p in (*s.references, *s.targets)})
            known = dict(zip(paths, embedder.embed_images([store(p) for p in paths]), strict=True))  # once each
            for method, rows in table[table.section == section].groupby("method", sort=False):
                to_refs, to_target = [], []
                for row in rows.itertuples():
                    sample = samples[row.sample_id]
                    image = embedder.embed_images([Image.open(root / "outputs" / "eval" / row.image).convert("RGB")])
                    for group, out in ((sample.references, to_refs), (sample.targets, to_target)):
                        others = torch.stack([known[p] for p in group])
                        out.append(float(cosine(image.expand(len(others), -1), others).mean()))
                gap = mean_ci([a - b for a, b in zip(to_refs, to_target, strict=True)], 0.95)
                print(f"  {method:18s} {sum(to_refs) / len(to_refs):.3f}  {sum(to_target) / len(to_target):.3f}  "
                      f"{gap.mean:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}]")


if __name__ == "__main__":
    main()
