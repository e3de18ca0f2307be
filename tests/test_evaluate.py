"""easyref evaluate: split and DreamBench loading, reference gain, and an end-to-end run with both baselines."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from components.testing import mlflow_store
from easyref.errors import UserError
from easyref.evaluate.reference_gain import partners
from easyref.evaluate.samples import Sample, load_split, sample_seed
from tests.conftest import SMALL_PIXELS, make_group

DREAMBENCH_PROMPTS = """Classes

subject_name,class
backpack,backpack
dog2,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


def write_split(root: Path, groups: int = 3, refs: int = 2, name: str = "held_out", first: int = 0) -> Path:
    """A held_out.parquet (or ``name``.parquet) in easyref split's layout (manifest columns + role), images beside
    it; groups ``first`` .. ``first + groups - 1``."""
    rows = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for g in range(first, first + groups):
        for i, image in enumerate(make_group(g, refs + 1)):
            path = f"images/g{g}_{i}.png"
            image.save(root / path)
            rows.append(
                {
                    "image_id": f"id{g}{i}",
                    "path": path,
                    "group": f"group-{g}",
                    "caption": f"a shape of group {g}",
                    "width": image.width,
                    "height": image.height,
                    "role": "target" if i == 0 else "reference",
                }
            )
    pd.DataFrame(rows).to_parquet(root / f"{name}.parquet")
    return root / f"{name}.parquet"


def write_dreambench(root: Path, subjects: int = 2, prompts: str = DREAMBENCH_PROMPTS) -> Path:
    """A DreamBench folder: ``subjects`` subject folders of 2 images and a prompts_and_classes.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(prompts)
    for s in range(subjects):
        (root / f"subject{s}").mkdir()
        for i, image in enumerate(make_group(100 + s, 2)):
            image.save(root / f"subject{s}" / f"{i:02d}.jpg")
    return root


def test_load_split_builds_one_sample_per_target(tmp_path):
    samples = load_split(write_split(tmp_path), base_seed=5)
    assert [s.sample_id for s in samples] == ["id00", "id10", "id20"]
    first = samples[0]
    assert first.group == "group-0" and first.caption == "a shape of group 0"
    assert first.targets == (tmp_path / "images/g0_0.png",)
    assert first.references == (tmp_path / "images/g0_1.png", tmp_path / "images/g0_2.png")
    assert first.seed == sample_seed(5, "id00") != sample_seed(6, "id00")


def test_load_split_uses_the_ingest_folder_named_by_split_json(tmp_path):
    ingest, split = tmp_path / "ingest", tmp_path / "split"
    split.mkdir()
    file = write_split(ingest).rename(split / "held_out.parquet")
    (split / "split.json").write_text(json.dumps({"manifest": str(ingest / "manifest.parquet")}))
    assert load_split(file)[0].targets == (ingest / "images/g0_0.png",)


def test_load_split_errors_name_the_file_row_and_field(tmp_path):
    file = write_split(tmp_path)
    frame = pd.read_parquet(file)
    frame.drop(columns=["role"]).to_parquet(tmp_path / "no_role.parquet")
    with pytest.raises(UserError, match=r"no_role.parquet: missing column\(s\) role"):
        load_split(tmp_path / "no_role.parquet")
    frame.loc[4, "path"] = "images/missing.png"
    frame.to_parquet(tmp_path / "bad_path.parquet")
    with pytest.raises(UserError, match=r"bad_path.parquet: row 4: image .*missing.png does not exist"):
        load_split(tmp_path / "bad_path.parquet")
    frame = pd.read_parquet(file)
    frame = frame[~((frame["group"] == "group-1") & (frame["role"] == "reference"))]
    frame.to_parquet(tmp_path / "lonely.parquet")
    with pytest.raises(UserError, match=r"row 3: group 'group-1' has a target but no reference rows"):
        load_split(tmp_path / "lonely.parquet")


def test_reference_gain_partners_come_from_another_group():
    def sample(i: int, group: str) -> Sample:
        return Sample(sample_id=str(i), group=group, caption="", references=(), targets=(), seed=0)

    samples = [sample(0, "a"), sample(1, "a"), sample(2, "b"), sample(3, "c")]
    assert partners(samples) == [2, 2, 3, 0]
    assert partners(samples[:2]) == [None, None]


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory) -> Path:
    import torch

    from easyref.model import ModelConfig, load_model

    torch.manual_seed(0)
    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    return model.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", ["reference", "adapter"], stage="test")


@pytest.fixture(scope="module")
def evaluation(tiny_models, checkpoint, tmp_path_factory) -> Path:
    """One evaluation of every baseline on three sections (3 held-out, 2 held-in and 2 DreamBench samples), 2 DDIM
    steps, logged to a throwaway sqlite store."""
    from easyref.cli import main

    root = tmp_path_factory.mktemp("eval")
    write_split(root / "data")  # held-out: groups 0-2
    write_split(root / "data", groups=2, name="held_in", first=3)  # held-in: groups 3-4
    dreambench = write_dreambench(
        root / "dreambench", prompts="'a {0} {1} on a table'.format(unique_token, class_token)"
    )
    params = root / "params.yaml"
    params.write_text(
        "evaluate:\n  batch_size: 2\n  report_samples: 2\n  reference_gain:\n    timesteps: 2\n"
        "  report_note: tiny models, toy data\n  lora_baseline:\n    steps: 3\n  caption_subsets:\n    no_zero: ['0']\n"
        "  palette: {red: [215, 30, 35], blue: [30, 70, 210], green: [30, 150, 60]}\n"
        f"  dreambench:\n    folder: {dreambench}\n"
    )
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--split",
            str(root / "data"),  # the split folder: held_in.parquet and held_out.parquet
            "--out",
            str(root / "out"),
            "--base",
            str(tiny_models),
            "--params",
            str(params),
            "--steps",
            "2",
            "--baseline",
            "text",
            "--baseline",
            "ip_adapter",
            "--baseline",
            "lora",
            "--tracking-uri",
            mlflow_store(root / "mlflow.db"),
        ]
    )
    assert code == 0
    return root


def test_evaluate_writes_one_table_with_checkpoint_and_baselines(evaluation):
    metrics = json.loads((evaluation / "out/metrics.json").read_text())
    assert metrics["num_samples"] == 3
    for method in ("easyref", "easyref_swapped", "text", "ip_adapter", "lora"):
        for name in ("clip_i", "clip_t", "dino_i", "colour"):
            value = metrics[f"{method}.{name}"]
            assert -1 <= value <= 1
            assert metrics[f"{method}.{name}.ci_low"] <= value <= metrics[f"{method}.{name}.ci_high"]
    assert all(isinstance(v, int | float) for v in metrics.values())  # flat numbers: what DVC metrics reads
    assert metrics["easyref.reference_gain"] == pytest.approx(
        metrics["easyref.loss_other"] - metrics["easyref.loss_own"], abs=1e-5
    )
    assert "text.reference_gain" not in metrics
    # the gain per noise band, as a share of the own-reference loss: a sample whose 2 draws fell in one band has
    # that band's share = its whole gain / its own loss
    table = pd.read_csv(evaluation / "out/samples.csv")
    bands = [c for c in table.columns if c.startswith("reference_gain_share_t")]
    assert bands == [f"reference_gain_share_t{lo}_{lo + 249}" for lo in (0, 250, 500, 750)]
    for _, row in table.query("method == 'easyref' and section == 'held_out'").iterrows():
        assert row[bands].notna().sum() in (1, 2)
        if row[bands].notna().sum() == 1:
            share = row[bands].dropna().iloc[0]
            assert share == pytest.approx(row["reference_gain"] / row["loss_own"], rel=1e-4)
    assert any(f"easyref.{b}" in metrics for b in bands)
    # the section over captions without the word "0": groups 1 and 2 only
    sub = table.query("section == 'held_out' and method == 'easyref' and group != 'group-0'")
    assert metrics["no_zero/easyref.colour"] == pytest.approx(sub["colour"].mean(), abs=1e-5)
    # with a palette, colour_match is a rate: each sample's share of targets with its generated image's colour
    rows = table.query("section == 'held_out' and method == 'easyref'")
    assert set(rows["colour_match"].unique()) <= {0.0, 1.0}  # one target per held-out sample here
    assert metrics["easyref.colour_match"] == pytest.approx(rows["colour_match"].mean(), abs=1e-5)
    # paired: EasyRef minus each baseline on the same samples, per section (Table 3's comparison)
    held_out = table.query("section == 'held_out'").set_index("sample_id")
    for baseline in ("text", "ip_adapter", "lora", "easyref_swapped"):
        diff = held_out.query("method == 'easyref'")["clip_i"] - held_out.query("method == @baseline")["clip_i"]
        key = f"paired/easyref_vs_{baseline}.clip_i"
        assert metrics[key] == metrics[f"held_out/{key}"] == pytest.approx(diff.mean(), abs=1e-5)
        assert metrics[f"{key}.ci_low"] <= metrics[key] <= metrics[f"{key}.ci_high"]
    assert "held_in/paired/ip_adapter_vs_text.dino_i.ci_low" in metrics
    # headline.json (what `dvc metrics show` prints): the Table-3 methods' means per section, nothing else
    headline = json.loads((evaluation / "out/headline.json").read_text())
    assert set(headline) == {"held_in", "held_out", "dreambench"}
    assert set(headline["held_out"]) == {"text", "ip_adapter", "lora", "easyref"}
    assert headline["held_out"]["easyref"] == {
        name: metrics[f"held_out/easyref.{name}"] for name in ("clip_i", "clip_t", "dino_i", "reference_gain")
    }


def test_one_evaluation_scores_held_in_held_out_and_dreambench_separately(evaluation):
    """Each section's keys are prefixed and computed over its own samples; the unprefixed keys (what the
    registration gate reads) are the held-out section's."""
    metrics = json.loads((evaluation / "out/metrics.json").read_text())
    table = pd.read_csv(evaluation / "out/samples.csv")
    sizes = {"held_in": 2, "held_out": 3, "dreambench": 2}
    assert table.groupby("section")["sample_id"].nunique().to_dict() == sizes
    assert set(table.query("section == 'held_in'")["group"]) == {"group-3", "group-4"}
    for section, size in sizes.items():
        assert metrics[f"{section}/num_samples"] == size
        rows = table.query("section == @section and method == 'easyref'")
        for name in ("clip_i", "clip_t", "dino_i", "reference_gain"):
            assert metrics[f"{section}/easyref.{name}"] == pytest.approx(rows[name].mean(), abs=1e-5)
        for method in ("text", "ip_adapter", "lora", "easyref_swapped"):
            assert f"{section}/{method}.clip_i.ci_low" in metrics
    for key in ("easyref.clip_i", "easyref.reference_gain.ci_low", "lora.dino_i", "no_zero/easyref.colour"):
        assert metrics[key] == metrics[f"held_out/{key}"]
    assert metrics["held_in/easyref.clip_i"] != metrics["held_out/easyref.clip_i"]

    # params.yaml's gate finds every metric it reads, and reads the held-out section's values
    from easyref.config import load_section
    from easyref.registry import RegisterConfig, evaluate_gate, read_metrics

    gate = load_section(RegisterConfig, Path(__file__).resolve().parents[1] / "params.yaml", "register").gate
    read = read_metrics(evaluation / "out/metrics.json")
    for line in evaluate_gate(read, read, gate):  # itself as champion: every rule gives a line
        assert line.challenger == pytest.approx(metrics[f"held_out/{line.metric}"])
    info = json.loads((evaluation / "out/evaluation.json").read_text())
    assert info["sections"] == "held_in, held_out, dreambench" and info["primary_section"] == "held_out"
    assert info["split"] == info["held_out/split"] == str(evaluation / "data/held_out.parquet")
    assert info["split_sha256"] == info["held_out/split_sha256"] != info["held_in/split_sha256"]
    assert info["dreambench/dreambench"] == str(evaluation / "dreambench")
    assert info["held_in/num_groups"] == 2 and info["held_in/seconds_per_group.lora"] > 0
    for section in sizes:
        assert len(list((evaluation / "out/grids" / section).glob("*.png"))) == 2  # report_samples per section


def test_evaluate_writes_per_sample_table_images_grids_and_report(evaluation):
    out = evaluation / "out"
    table = pd.read_csv(out / "samples.csv")
    assert len(table) == 5 * (3 + 2 + 2)  # methods x (held-out + held-in + DreamBench samples)
    assert set(table["method"]) == {"easyref", "easyref_swapped", "text", "ip_adapter", "lora"}
    assert table.loc[table["method"] == "easyref", "reference_gain"].notna().all()
    assert all((out / p).is_file() for p in table["image"])
    report = (out / "report.html").read_text()
    for text in (
        "held-in (targets of training groups)",
        "held-out (groups unseen in training)",
        "DreamBench",
        "Primary section",
        "EasyRef (checkpoint)",
        "SDXL, text only",
        "IP-Adapter-SDXL (mean)",
        "Per-group LoRA (SDXL, text only)",
        "CLIP-I",
        "DINO-I",
        "Reference gain",
        "another group's references",
        "as a share of the loss with the own references, by timestep",  # per noise band
        "tiny models, toy data",
        "data:image/png;base64,",
        "seconds per group",
        "Table 3 in kind",
        "On held-out groups the paper's ordering EasyRef > IP-Adapter > text-only",  # then: holds, or does not
        "EasyRef (checkpoint) - SDXL, text only",
    ):
        assert text in html.unescape(report)
    assert re.search(r"t (0-249|250-499|500-749|750-999): ", html.unescape(report))
    info = json.loads((out / "evaluation.json").read_text())
    assert info["num_groups"] == 3 and info["seconds_per_group.easyref"] > 0
    assert info["model.aggregation"] == "tokens" and info["model.num_tokens"] == 8
    # the per-group LoRA's time per group (tuning + generation) next to EasyRef's, and its tuning part
    assert info["seconds_per_group.lora"] >= info["tuning_seconds_per_group.lora"] > 0
    assert len(info["checkpoint_sha256"]) == 64 and len(info["split_sha256"]) == 64
    # the seal `easyref register` checks: the digests of metrics.json and samples.parquet as evaluate wrote them
    from easyref.data.parquet import sha256_file

    assert info["metrics_sha256"] == sha256_file(out / "metrics.json")
    assert info["samples_sha256"] == sha256_file(out / "samples.parquet")


def test_evaluate_logs_params_metrics_and_report_to_mlflow(evaluation):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{evaluation / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("easyref-evaluate")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["easyref.clip_i"] == pytest.approx(
        json.loads((evaluation / "out/metrics.json").read_text())["easyref.clip_i"]
    )
    assert run.data.params["evaluate.steps"] == "2"
    assert run.data.metrics["held_in/easyref.clip_i"] == pytest.approx(
        json.loads((evaluation / "out/metrics.json").read_text())["held_in/easyref.clip_i"]
    )
    assert run.data.params["primary_section"] == "held_out" and "held_in/split_sha256" in run.data.params
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "headline.json", "report.html", "samples.csv", "grids"} <= names
    info = json.loads((evaluation / "out/evaluation.json").read_text())
    assert run.data.tags["easyref.metrics_sha256"] == info["metrics_sha256"]  # what register checks
    assert run.data.tags["easyref.checkpoint_sha256"] == info["checkpoint_sha256"]


def test_per_sample_images_do_not_depend_on_batch_size(tiny_models, checkpoint, evaluation):
    """The same seed per sample: a re-run with another batch size and only the second sample gives its image."""
    import numpy as np
    from PIL import Image

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.generation import generate_easyref
    from easyref.evaluate.samples import ImageStore
    from easyref.sampler import EasyRefSampler

    sampler = EasyRefSampler.from_pretrained(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=checkpoint)
    sample = load_split(evaluation / "data/held_out.parquet")[1]
    (image,) = generate_easyref(sampler, [sample], ImageStore(), EvaluateConfig(steps=2, batch_size=1))
    before = np.asarray(Image.open(evaluation / "out/images/held_out/easyref" / f"{sample.slug}.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - before).max() <= 2  # batched vs single MLLM padding


def test_reference_scale_sets_how_strongly_easyref_follows_its_references(tiny_models, checkpoint, evaluation):
    """`evaluate.reference_scale` reaches the sampler: 0 gives the text-only image of the same seed (this checkpoint
    has no LoRA), 0.5 an image between, and a negative scale is refused."""
    import numpy as np

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.generation import generate_easyref
    from easyref.evaluate.samples import ImageStore
    from easyref.sampler import EasyRefSampler

    sampler = EasyRefSampler.from_pretrained(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=checkpoint)
    samples = load_split(evaluation / "data/held_out.parquet")[:1]

    def image(**kw):
        config = EvaluateConfig(steps=2, batch_size=1, **{k: v for k, v in kw.items() if k != "text_only"})
        (im,) = generate_easyref(sampler, samples, ImageStore(), config, text_only=kw.get("text_only", False))
        return np.asarray(im, dtype=np.int16)

    text, off, half, full = image(text_only=True), image(reference_scale=0.0), image(reference_scale=0.5), image()
    assert np.array_equal(off, text)
    assert np.abs(half - text).max() > 0 and np.abs(half - full).max() > 0
    with pytest.raises(ValueError, match="reference_scale must be a finite number >= 0"):
        EvaluateConfig(reference_scale=-1.0)


def test_images_per_sample_averages_each_samples_draws(tiny_models, checkpoint, evaluation):
    """`--images-per-sample 2`: every method draws each sample twice, the first draw with the sample's own seed (the
    image of a one-draw run), the second with another; samples.parquet keeps one row per draw and image, while every
    mean and interval is over samples (each the mean of its draws) and the reference gain is measured once per
    sample."""
    import numpy as np
    from PIL import Image

    from easyref.cli import main
    from easyref.evaluate.config import EvaluateConfig

    out = evaluation / "out_draws"
    params = evaluation / "params_draws.yaml"
    params.write_text("evaluate:\n  batch_size: 2\n  reference_gain:\n    timesteps: 2\n")
    code = main(["evaluate", "--checkpoint", str(checkpoint), "--split", str(evaluation / "data/held_out.parquet"),
                 "--out", str(out), "--base", str(tiny_models), "--params", str(params), "--steps", "2",
                 "--baseline", "text", "--images-per-sample", "2", "--tracking-uri",
                 mlflow_store(evaluation / "mlflow_draws.db")])
    assert code == 0
    table = pd.read_parquet(out / "samples.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "evaluation.json").read_text())
    assert metrics["num_samples"] == 3 and info["images_per_sample"] == 2
    assert len(table) == 3 * 3 * 2  # easyref, swapped, text x 3 samples x 2 draws
    assert (table.groupby(["method", "sample_id"])["draw"].apply(sorted) == pd.Series([[0, 1]] * 9).values).all()
    one = load_split(evaluation / "data/held_out.parquet")
    first = table[table["draw"] == 0].set_index(["method", "sample_id"])
    assert (first.loc["easyref", "seed"] == pd.Series({s.sample_id: s.seed for s in one})).all()
    assert table.groupby(["method", "sample_id"])["seed"].nunique().eq(2).all()
    for sample in one:  # the first draw is the one-draw run's image; the second is another image
        path = table.query("method == 'easyref' and sample_id == @sample.sample_id and draw == 0")["image"].iloc[0]
        again = np.asarray(Image.open(out / path), dtype=np.int16)
        before = np.asarray(Image.open(evaluation / "out/images/held_out/easyref" / f"{sample.slug}.png"),
                            dtype=np.int16)
        assert np.abs(again - before).max() <= 2  # batched vs single MLLM padding
        second = np.asarray(Image.open(out / "images/held_out/easyref" / f"{sample.slug}-draw1.png"), dtype=np.int16)
        assert np.abs(second - again).max() > 2
    means = table.groupby(["method", "sample_id"])["clip_i"].mean()
    assert metrics["easyref.clip_i"] == pytest.approx(means["easyref"].mean(), abs=1e-5)
    diff = means["easyref"] - means["text"]
    assert metrics["paired/easyref_vs_text.clip_i"] == pytest.approx(diff.mean(), abs=1e-5)
    gains = table.query("method == 'easyref'").set_index("draw")["reference_gain"]
    assert gains.loc[0].notna().all() and gains.loc[1].isna().all()
    assert metrics["easyref.reference_gain"] == pytest.approx(gains.loc[0].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="images_per_sample must be >= 1"):
        EvaluateConfig(images_per_sample=0)


def test_evaluate_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from easyref.cli import main

    split = write_split(tmp_path / "data", groups=1, refs=1)
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--split", str(split), "--out", str(tmp_path / "o")]) == 2
    assert "not an EasyRef checkpoint" in capsys.readouterr().err


def test_caption_subsets_match_whole_words_only():
    from easyref.evaluate.scoring import caption_mentions

    assert caption_mentions("a small Red star", ["red"])
    assert not caption_mentions("a small striped star on a pale background", ["red"])  # "striped" holds "red"
    assert caption_mentions("a polka-dot star", ["polka-dot"])


def test_colour_similarity_sees_the_subject_colour_not_the_background():
    from PIL import Image, ImageDraw

    from easyref.metrics import colour_similarity

    def disc(colour, background, box):
        im = Image.new("RGB", (64, 64), background)
        ImageDraw.Draw(im).ellipse(box, fill=colour)
        return im

    red = disc((215, 30, 35), (250, 250, 250), (10, 10, 40, 40))
    red_elsewhere = disc((215, 30, 35), (205, 225, 250), (30, 20, 60, 50))  # other place, pale blue background
    blue = disc((30, 70, 210), (250, 250, 250), (10, 10, 40, 40))
    assert colour_similarity(red, red_elsewhere) > 0.9
    assert colour_similarity(red, blue) < 0.1
    assert colour_similarity(Image.new("RGB", (64, 64), (250, 250, 250)), red) == 0.0  # nothing saturated


def test_compare_reads_what_evaluate_wrote(evaluation, capsys):
    from easyref.cli import main

    assert main(["compare", str(evaluation / "out")]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert "held-in CLIP-I" in head and "held-out DINO-I" in head and "DreamBench CLIP-T" in head
    row = next(line for line in out.splitlines() if "EasyRef (aggregation=tokens, tokens=8, layer=-1)" in line)
    metrics = json.loads((evaluation / "out/metrics.json").read_text())
    assert f"{metrics['held_in/easyref.clip_i']:.3f}" in row and f"{metrics['held_out/easyref.clip_i']:.3f}" in row
    assert "Per-group LoRA" in out and "published (paper), not ours" in out


def test_report_template_is_installed_as_package_data():
    """The report's jinja2 template ships with the wheel: pyproject's package-data names it."""
    import tomllib

    import easyref.evaluate

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = Path(easyref.evaluate.__file__).parent
    shipped = {p for pattern in patterns["easyref.evaluate"] for p in package.glob(pattern)}
    assert package / "templates" / "report.html.j2" in shipped


def test_reference_gain_per_noise_band():
    """Each draw goes to the quarter of the schedule its timestep lies in; a band's value is its draws' gain as a
    share of their own-reference loss; a band without a draw is NaN."""
    import math

    from easyref.evaluate.reference_gain import band_columns, per_band

    assert [c for c, _, _ in band_columns(1000)][-1] == "reference_gain_share_t750_999"
    own, other = [0.1, 0.2, 0.01, 0.3], [0.11, 0.2, 0.012, 0.33]
    bands = per_band(own, other, [0, 260, 999, 249], 1000)
    assert bands["reference_gain_share_t0_249"] == pytest.approx((0.11 + 0.33 - 0.4) / 0.4)
    assert bands["reference_gain_share_t250_499"] == 0.0
    assert math.isnan(bands["reference_gain_share_t500_749"])
    assert bands["reference_gain_share_t750_999"] == pytest.approx(0.2)  # a small loss, a large share


def test_report_shows_a_small_reference_gain_with_its_significant_digits():
    """A gain of 2e-4 with an interval above 0 must not read as 0.000 [0.000, 0.000]."""
    from easyref.evaluate.report import _cell
    from easyref.metrics import Summary

    cell = str(_cell(Summary(mean=1.98e-4, low=5.2e-5, high=3.43e-4, std=0.0, count=24)))
    assert "1.98e-04" in cell and "5.20e-05" in cell and "0.000" not in cell
    assert str(_cell(Summary(mean=0.181, low=0.04, high=0.322, std=0.0, count=24))).startswith("0.181")
