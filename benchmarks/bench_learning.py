"""Does EasyRef training make the model use its references? The demo's learning check, with a control.

On the tiny profile (pretrained tiny base, demo data, the demo's split), this trains stage 1 twice for the same
number of steps: once as the paper does, and once with the references removed (every sample's group replaced by
the black "no reference" image, so nothing can be learned from them). Both are evaluated on the held-out groups:

- reference gain: denoising loss with another group's references minus with the sample's own (95% interval);
- Colour on the held-out samples whose caption names no colour: EasyRef vs text-only SDXL (same base, same seeds);
- CLIP-I with the sample's own references vs another group's;
- the promotion gate of params.yaml (``register.gate``) on each.

  python benchmarks/bench_learning.py                 # the demo's stage-1 budget (params.yaml train.pretrain)
  python benchmarks/bench_learning.py --steps 150     # a shorter run (what the slow test runs)

Everything runs through the ``easyref`` command line in a work folder (default: a temp folder), one thread per
process unless OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def easyref(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "easyref.cli", *args], cwd=cwd, env=env, check=True)


def prepare(work: Path, params: dict) -> None:
    """Tiny models, demo data, ingest and split, as `make demo` makes them."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    easyref("tiny-models", "--out", "models/tiny", cwd=work)  # does nothing when complete
    if not (work / "data/split/held_out.parquet").is_file():
        # the demo's caption setting (with no caption naming the colour, only the references tell it) and subjects
        data, flags = params.get("data", {}), []
        for flag, key in (("--omit-colour", "demo_omit_colour"), ("--patterns", "demo_patterns")):
            if data.get(key) is not None:
                flags += [flag, str(data[key])]
        easyref("demo-data", "--out", "data/raw", *flags, cwd=work)
        easyref("ingest", "data/raw", "--out", "data/ingested", "--params", "params.yaml", "--no-progress", cwd=work)
        easyref("split", "--manifest", "data/ingested/manifest.parquet", "--out", "data/split",
                "--params", "params.yaml", cwd=work)


def train_and_evaluate(work: Path, params: dict, name: str, steps: int, references: bool,
                       max_samples: int | None) -> dict:
    """Stage 1 for ``steps`` steps (without references if not ``references``), then evaluate on held_out."""
    run = dict(params)
    run["train"] = {**params["train"], "preview_every": -1}
    if not references:
        # every sample loses its references: the image drop and the both-drop share all the probability
        drops = params["train"]
        run["train"]["drop_text"], run["train"]["drop_image"] = 0.0, 1.0 - drops.get("drop_both", 0.1)
        run["train"]["drop_both"] = drops.get("drop_both", 0.1)
    run["evaluate"] = {**params["evaluate"], "baselines": ["text"], "report_samples": 4}
    if max_samples:
        run["evaluate"]["max_samples"] = max_samples
    (work / f"params_{name}.yaml").write_text(yaml.safe_dump(run))
    easyref("train", "--stage", "pretrain", "--params", f"params_{name}.yaml", "--base", "models/tiny",
            "--data", "data/split/train.parquet", "--image-root", "data/ingested", "--out", f"runs/{name}",
            "--max-steps", str(steps), "--save-every", "0", cwd=work)
    easyref("evaluate", "--checkpoint", f"runs/{name}/final", "--split", "data/split/held_out.parquet",
            "--base", "models/tiny", "--params", f"params_{name}.yaml", "--out", f"eval/{name}",
            "--tracking-uri", "sqlite:///mlflow.db", cwd=work)
    return json.loads((work / f"eval/{name}/metrics.json").read_text())


def gate(metrics: dict, params: dict) -> tuple[bool, list[str]]:
    """``register.gate`` of params.yaml as a first registration (no champion yet) faces it."""
    from easyref.config import from_dict
    from easyref.registry.config import RegisterConfig
    from easyref.registry.gate import evaluate_gate

    config = from_dict(RegisterConfig, params.get("register", {}), where="params.yaml: register")
    lines = evaluate_gate(metrics, None, config.gate)
    return all(line.passed for line in lines), [line.describe() for line in lines]


def interval(metrics: dict, key: str) -> str:
    mean, low, high = (metrics.get(k) for k in (key, f"{key}.ci_low", f"{key}.ci_high"))
    return "-" if mean is None else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def report(results: dict[str, dict], params: dict) -> None:
    print(f"\n{'':26s}" + "".join(f"{name:>36s}" for name in results))
    rows = [
        ("reference gain", "easyref.reference_gain"),
        ("Colour, no-colour captions", "no_colour/easyref.colour"),
        ("  text-only SDXL", "no_colour/text.colour"),
        ("CLIP-I EasyRef - text-only", "paired/easyref_vs_text.clip_i"),   # paired, bootstrap over groups
        ("CLIP-I own references", "easyref.clip_i"),
        ("CLIP-I swapped references", "easyref_swapped.clip_i"),
        ("Colour own references", "easyref.colour"),
        ("Colour swapped references", "easyref_swapped.colour"),
    ]
    for label, key in rows:
        print(f"{label:26s}" + "".join(f"{interval(m, key):>36s}" for m in results.values()))
    for name, metrics in results.items():
        passed, lines = gate(metrics, params)
        print(f"gate ({name}): {'passes' if passed else 'blocks'}: " + "; ".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (default: params.yaml's)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N held-out samples")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    steps = args.steps or params["train"]["pretrain"]["max_steps"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_learning_"))
    prepare(work, params)
    results = {
        f"with references ({steps} steps)": train_and_evaluate(work, params, "refs", steps, True, args.max_samples),
        "references removed (control)": train_and_evaluate(work, params, "norefs", steps, False, args.max_samples),
    }
    report(results, params)
    print(f"\nwork folder: {work} (reports: eval/*/report.html)")


if __name__ == "__main__":
    main()
