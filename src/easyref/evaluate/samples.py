"""Test samples: a held-in / held-out split file, or a DreamBench folder; the images they name.

A split file is written by ``easyref split``: each ``role == "target"`` row is one sample; its references are the
``reference`` rows of the same group; image ``path`` values are relative to the ingest folder, found through the
``split.json`` beside the split file or given with ``--images-root``. A DreamBench folder holds
``DIR/<subject>/*.jpg`` and ``DIR/prompts_and_classes.txt``; every subject x prompt is a sample whose references
and targets are the subject's images.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.errors import UserError
from easyref.evaluate.config import DreamBenchConfig

if TYPE_CHECKING:
    from PIL import Image

SPLIT_COLUMNS = ("image_id", "path", "group", "caption", "role")


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One test sample: a prompt, the reference group, and the image(s) the result is compared with."""

    sample_id: str
    group: str
    caption: str
    references: tuple[Path, ...]
    targets: tuple[Path, ...]
    seed: int
    reference_captions: tuple[str, ...] = ()
    """The references' own captions, in the order of ``references`` (what the per-group LoRA is tuned on)."""
    draw: int = 0
    """Which of the sample's images this is (``evaluate.images_per_sample``; 0 = the first, seeded with the
    sample's seed): the draws of a sample share its id, caption and targets, and differ in their seed."""

    @property
    def slug(self) -> str:
        """A file-name-safe form of the id (and of the draw, after the first)."""
        suffix = f"-draw{self.draw}" if self.draw else ""
        return re.sub(r"[^A-Za-z0-9_.-]+", "__", self.sample_id) + suffix


def sample_seed(base_seed: int, sample_id: str) -> int:
    """A per-sample seed that depends only on the base seed and the id."""
    return (zlib.crc32(sample_id.encode()) + 1_000_003 * base_seed) % (2**31)


def with_draws(samples: list[Sample], images_per_sample: int, base_seed: int = 0) -> list[Sample]:
    """``samples``, then each sample's further draws up to ``images_per_sample`` (draw-major: every sample's draw 1,
    then every sample's draw 2, ...), each seeded from the base seed, the id and the draw; 1 = ``samples`` as they
    are. The first draws keep their order, so whatever shows the first N samples shows the same ones."""
    further = [
        dataclasses.replace(s, draw=d, seed=sample_seed(base_seed, f"{s.sample_id}#draw{d}"))
        for d in range(1, images_per_sample)
        for s in samples
    ]
    return [*samples, *further]


def images_root_for(split_file: Path) -> Path:
    """The folder the split's image paths are relative to: the ingest folder named by ``split.json``, if any."""
    info = split_file.parent / "split.json"
    if info.is_file():
        try:
            manifest = json.loads(info.read_text()).get("manifest")
        except json.JSONDecodeError as exc:
            raise UserError(f"{info}: not valid JSON ({exc}); pass --images-root") from exc
        if manifest and Path(manifest).parent.is_dir():
            return Path(manifest).parent
    return split_file.parent


def load_split(split_file: str | Path, images_root: str | Path | None = None, base_seed: int = 0) -> list[Sample]:
    """Test samples of a held-in / held-out split file (see the module docstring)."""
    import pandas as pd

    split_file = Path(split_file)
    if not split_file.is_file():
        raise UserError(f"{split_file}: no such split file (written by `easyref split`)")
    try:
        frame = pd.read_parquet(split_file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise UserError(f"{split_file}: cannot read as parquet ({exc})") from exc
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{split_file}: missing column(s) {', '.join(missing)}; expected {', '.join(SPLIT_COLUMNS)}")
    root = Path(images_root) if images_root is not None else images_root_for(split_file)
    bad_roles = frame.loc[~frame["role"].isin(["target", "reference"])]
    if len(bad_roles):
        row = int(bad_roles.index[0])
        raise UserError(
            f"{split_file}: row {row}: role {bad_roles['role'].iloc[0]!r} is neither 'target' nor 'reference'"
        )
    for row, path in zip(frame.index, frame["path"], strict=True):
        if not (root / str(path)).is_file():
            raise UserError(
                f"{split_file}: row {row}: image {root / str(path)} does not exist; pass --images-root "
                "(the folder `easyref ingest` wrote)"
            )
    groups = frame[frame["role"] == "reference"].groupby("group", sort=False)
    references = {g: tuple(root / p for p in rows["path"]) for g, rows in groups}
    reference_captions = {g: tuple(str(c) for c in rows["caption"]) for g, rows in groups}
    samples = []
    for row, target in frame[frame["role"] == "target"].iterrows():
        group = str(target["group"])
        if group not in references:
            raise UserError(f"{split_file}: row {row}: group {group!r} has a target but no reference rows")
        sample_id = str(target["image_id"])
        samples.append(
            Sample(
                sample_id=sample_id,
                group=group,
                caption=str(target["caption"]),
                references=references[group],
                targets=(root / str(target["path"]),),
                seed=sample_seed(base_seed, sample_id),
                reference_captions=reference_captions[group],
            )
        )
    if not samples:
        raise UserError(f"{split_file}: no rows with role 'target': nothing to evaluate")
    return samples


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
_PROMPT_LINE = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*\.format\(""")


def _read_lines(path: Path) -> list[str]:
    """The file's lines; bytes that are not UTF-8 are refused naming the line (the prompts become captions)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); save the file as UTF-8"
        ) from None


def _check_template(template: str, where: str) -> None:
    """Only the placeholders ``{0}`` (unique token) and ``{1}`` (class), the latter required; ``{{``/``}}`` are
    literal braces. Anything else (``{2}``, ``{x}``, ``{}``, a format spec or an attribute) is refused, naming the
    line, before it can fail or expand inside ``str.format``."""
    import string

    fields = []
    try:
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            if name not in ("0", "1") or spec or conversion:
                field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise UserError(
                    f"{where}: prompt {template!r} has the placeholder {field}; only {{0}} (the unique token) and "
                    "{1} (the class) are filled (write {{ and }} for literal braces)"
                )
            fields.append(name)
    except ValueError as exc:  # an unmatched brace
        raise UserError(
            f"{where}: prompt {template!r} is not a valid template ({exc}); write {{{{ and }}}} for literal braces"
        ) from None
    if "1" not in fields:
        raise UserError(f"{where}: prompt {template!r} has no {{1}} (class) placeholder")


def parse_dreambench_prompts(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """``(classes, object_prompts, live_prompts)`` of DreamBench's ``prompts_and_classes.txt``.

    Classes are the ``subject_name,class`` lines of the ``Classes`` section; prompts are the quoted templates of
    ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` lines, under the ``Object Prompts`` and ``Live
    Subject Prompts`` headings. A file with only prompt lines gives the same prompts to every subject.
    """
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = "object"
    for number, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        lowered = line.lower()
        if lowered.startswith("live subject prompts"):
            section = "live"
        elif lowered.startswith("object prompts"):
            section = "object"
        elif match := _PROMPT_LINE.match(line):
            template = match["template"]
            _check_template(template, f"{path}:{number}")
            prompts[section].append(template)
        elif "," in line and " " not in line.split(",")[0] and lowered != "subject_name,class":
            subject, cls = (s.strip() for s in line.split(",", 1))
            classes[subject] = cls
    if not prompts["object"] and not prompts["live"]:
        raise UserError(f"{path}: no prompts found (expected lines like 'a {{0}} {{1}} in the snow'.format(...))")
    return classes, prompts["object"], prompts["live"] or prompts["object"]


def fill_prompt(template: str, unique_token: str, class_token: str) -> str:
    """``'a {0} {1} in the snow'`` -> ``'a sks dog in the snow'`` (or ``'a dog in the snow'`` with no token)."""
    return " ".join(template.format(unique_token, class_token).split())


def load_dreambench(root: str | Path, config: DreamBenchConfig, base_seed: int = 0) -> list[Sample]:
    """One sample per subject x prompt of a DreamBench folder; references and targets are the subject's images."""
    root = Path(root)
    prompts_file = root / "prompts_and_classes.txt"
    if not prompts_file.is_file():
        raise UserError(
            f"{root}: no prompts_and_classes.txt; expected DreamBench's layout (DIR/<subject>/*.jpg and "
            "DIR/prompts_and_classes.txt)"
        )
    classes, object_prompts, live_prompts = parse_dreambench_prompts(prompts_file)
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            continue
        cls = classes.get(folder.name, folder.name.replace("_", " "))
        templates = live_prompts if cls in config.live_classes else object_prompts
        for i, template in enumerate(templates):
            sample_id = f"{folder.name}/{i:02d}"
            samples.append(
                Sample(
                    sample_id=sample_id,
                    group=folder.name,
                    caption=fill_prompt(template, config.unique_token, cls),
                    references=images,
                    targets=images,
                    seed=sample_seed(base_seed, sample_id),
                    reference_captions=(fill_prompt("a {0} {1}", config.unique_token, cls),) * len(images),
                )
            )
    if not samples:
        raise UserError(f"{root}: no subject folder with images")
    return samples


def load_image(path: Path) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot be read as an image ({exc})") from exc


class ImageStore:
    """Opens each image file once per evaluation."""

    def __init__(self) -> None:
        self._images: dict[Path, Image.Image] = {}

    def __call__(self, path: Path) -> Image.Image:
        if path not in self._images:
            self._images[path] = load_image(path)
        return self._images[path]

    def group(self, paths: Sequence[Path]) -> list[Image.Image]:
        return [self(p) for p in paths]
