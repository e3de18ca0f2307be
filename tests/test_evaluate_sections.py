"""The evaluation sets of one `easyref evaluate` run: a split folder's held-in and held-out files, one split file, a
DreamBench folder; their metric keys; DreamBench's prompts and layout."""

from __future__ import annotations

import pandas as pd
import pytest

from easyref.errors import UserError
from easyref.evaluate.config import DreamBenchConfig, EvaluateConfig
from easyref.evaluate.samples import fill_prompt, load_dreambench, parse_dreambench_prompts
from easyref.evaluate.sections import combine, load_sections, primary, split_keys
from tests.conftest import make_group
from tests.test_evaluate import DREAMBENCH_PROMPTS, write_dreambench, write_split


def test_a_split_folder_gives_held_in_then_held_out(tmp_path):
    write_split(tmp_path, groups=3)
    write_split(tmp_path, groups=2, name="held_in", first=3)
    sections = load_sections(tmp_path, None, None, EvaluateConfig(max_samples=2))
    assert [s.name for s in sections] == ["held_in", "held_out"]  # the paper's order
    held_in, held_out = sections
    assert {s.group for s in held_in.samples} == {"group-3", "group-4"} and held_in.num_groups == 2
    assert len(held_out.samples) == 2  # max_samples applies to each section
    assert held_out.source["split"] == str(tmp_path / "held_out.parquet") and len(held_out.source["split_sha256"]) == 64
    assert held_in.title.startswith("held-in") and held_out.title.startswith("held-out")


def test_one_split_file_is_one_section_and_dreambench_a_third(tmp_path):
    file = write_split(tmp_path / "data", groups=2, name="held_in")
    dreambench = write_dreambench(tmp_path / "db", subjects=2)
    sections = load_sections(file, dreambench, None, EvaluateConfig())
    assert [s.name for s in sections] == ["held_in", "dreambench"]
    assert sections[1].source == {"dreambench": str(dreambench)} and sections[1].num_groups == 2
    other = write_split(tmp_path / "other", groups=2, name="my test set")
    assert [s.name for s in load_sections(other, None, None, EvaluateConfig())] == ["my_test_set"]


def test_a_split_file_without_targets_is_skipped_in_a_folder_and_refused_alone(tmp_path, capsys):
    write_split(tmp_path, groups=2)
    empty = write_split(tmp_path, groups=1, name="held_in", first=5)
    frame = pd.read_parquet(empty)
    frame[frame["role"] == "reference"].to_parquet(empty)  # `held_in_groups: 0` writes a file like this
    assert [s.name for s in load_sections(tmp_path, None, None, EvaluateConfig())] == ["held_out"]
    assert "held_in.parquet has no target rows; its section is skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match="held_in.parquet: no rows with role 'target'"):
        load_sections(empty, None, None, EvaluateConfig())


def test_split_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(UserError, match=r"neither held_in.parquet nor held_out.parquet in this folder"):
        load_sections(tmp_path, None, None, EvaluateConfig())
    with pytest.raises(UserError, match=r"missing.parquet: no such split file or folder"):
        load_sections(tmp_path / "missing.parquet", None, None, EvaluateConfig())
    with pytest.raises(UserError, match=r"nothing to evaluate"):
        load_sections(None, None, None, EvaluateConfig())


def test_evaluate_without_any_evaluation_set_exits_2_with_one_line(tmp_path, capsys):
    from easyref.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "nothing to evaluate: pass --split" in err and "--dreambench" in err


def test_section_keys_are_prefixed_and_the_primary_is_also_unprefixed():
    assert primary(["held_in", "held_out", "dreambench"]) == "held_out"
    assert primary(["held_in", "dreambench"]) == "held_in" and primary(["dreambench"]) == "dreambench"
    per = {"held_in": {"easyref.clip_i": 0.7, "num_samples": 2}, "held_out": {"easyref.clip_i": 0.6, "num_samples": 3}}
    flat = combine(per, "held_out")
    assert flat == {
        "easyref.clip_i": 0.6,
        "num_samples": 3,
        "held_in/easyref.clip_i": 0.7,
        "held_in/num_samples": 2,
        "held_out/easyref.clip_i": 0.6,
        "held_out/num_samples": 3,
    }
    assert split_keys({**flat, "no_colour/easyref.clip_i": 0.1}, ["held_in", "held_out"]) == per


def test_dreambench_prompts_are_parsed_and_filled(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)
    classes, objects, live = parse_dreambench_prompts(tmp_path / "prompts_and_classes.txt")
    assert classes == {"backpack": "backpack", "dog2": "dog"}
    assert objects == ["a {0} {1} in the jungle", "a red {0} {1}"]
    assert len(live) == 3
    assert fill_prompt(objects[1], "sks", "backpack") == "a red sks backpack"
    assert fill_prompt(objects[1], "", "backpack") == "a red backpack"


def test_dreambench_layout_gives_subject_times_prompt_samples(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)
    for subject, seed in (("backpack", 1), ("dog2", 2), ("teapot", 3)):  # teapot: not in Classes
        (tmp_path / subject).mkdir()
        for i, image in enumerate(make_group(seed, 2)):
            image.save(tmp_path / subject / f"{i:02d}.jpg")
    samples = load_dreambench(tmp_path, DreamBenchConfig())
    by_subject = {g: [s for s in samples if s.group == g] for g in ("backpack", "dog2", "teapot")}
    assert [len(v) for v in by_subject.values()] == [2, 3, 2]  # dogs get the live-subject prompts
    dog = by_subject["dog2"][1]
    assert dog.caption == "a dog wearing a red hat" and dog.sample_id == "dog2/01" and dog.slug == "dog2__01"
    assert dog.references == dog.targets == (tmp_path / "dog2/00.jpg", tmp_path / "dog2/01.jpg")
    assert by_subject["teapot"][0].caption == "a teapot in the jungle"
    token = load_dreambench(tmp_path, DreamBenchConfig(unique_token="sks"))
    assert token[0].caption == "a sks backpack in the jungle"


def test_dreambench_without_prompts_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="prompts_and_classes.txt"):
        load_dreambench(tmp_path, DreamBenchConfig())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"'a caf\xe9 {0} {1}'.format(unique_token, class_token)", "not UTF-8 (byte 0xe9 at offset"),
        (b"'a {0} {1} and {2}'.format(unique_token, class_token)", "has the placeholder {2}; only {0}"),
        (b"'a {x} {1}'.format(unique_token, class_token)", "has the placeholder {x}; only {0}"),
        (b"'a {1:>999999999}'.format(unique_token, class_token)", "has the placeholder {1:>999999999}; only {0}"),
        (b"'a {1} }'.format(unique_token, class_token)", "is not a valid template (Single '}' encountered"),
    ],
    ids=["not-utf8", "index-2", "name-x", "format-spec", "lone-brace"],
)
def test_a_bad_dreambench_prompts_file_exits_2_with_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    from easyref.cli import main

    root = write_dreambench(tmp_path / "db", subjects=1)
    prompts = root / "prompts_and_classes.txt"
    lines = prompts.read_bytes().splitlines()
    number = next(i for i, x in enumerate(lines, start=1) if x.startswith(b"'a red"))
    lines[number - 1] = line
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    args = ["evaluate", "--checkpoint", str(tmp_path), "--dreambench", str(root), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    (error,) = [x for x in err.splitlines() if "error" in x]
    assert f"{prompts}:{number}: " in error and message in error and "Traceback" not in err


def test_max_samples_takes_the_groups_in_turn(tmp_path):
    """DreamBench has many prompts per subject: the first N rows would all be the first subject's."""
    dreambench = write_dreambench(tmp_path / "db", subjects=3)
    (section,) = load_sections(None, dreambench, None, EvaluateConfig(max_samples=4))
    everything = load_sections(None, dreambench, None, EvaluateConfig())[0].samples
    assert len({s.group for s in everything[:4]}) < 3  # what a plain cut would evaluate
    groups = [s.group for s in section.samples]
    assert len(groups) == 4 and len(set(groups)) == 3 and groups[3] == groups[0]  # each subject, then the first again
    assert section.samples[3] == next(s for s in everything if s.group == groups[0] and s != section.samples[0])
