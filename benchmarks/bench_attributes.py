"""After ``make demo``: which of their group's attributes (colour, shape, pattern) each method's images show.

Run:  .venv/bin/python benchmarks/bench_attributes.py [--demo .] [--threads 2]

CLIP-I and DINO-I say how close an image is to its group, not in what. The demo's groups are subjects of the
synthetic catalogue (a colour, a shape and a pattern; the group folder's name spells them, e.g.
``checkered-blue-triangle``), so each generated image of ``outputs/eval/samples.parquet`` is asked three questions:
- colour: the palette colour its subject is drawn in (``easyref.metrics.named_colour``) is the group's;
- shape: the tiny CLIP judge (``models/tiny/clip``), choosing among the six shapes with the group's colour and
  pattern in every option ("a checkered blue triangle" against "a checkered blue star", ...), picks the group's;
- pattern: the same judge, choosing among the four patterns with the group's colour and shape, picks the group's.
The same questions on the targets themselves give the most each rate can show with these judges (``targets``);
chance is 1/8, 1/6 and 1/4. Per method and section it prints the three rates, and for every method against
EasyRef the paired difference of the shape and pattern hits with a 95% interval over groups. Nothing is asserted.
"""

from __future__ import annotations

from demo_outputs import demo_arguments, demo_outputs, demo_samples
from PIL import Image

ASPECTS = ("colour", "shape", "pattern")


def subject_of(group: str):
    """The catalogue subject a demo group folder names (``checkered-blue-triangle`` / ``red-star``)."""
    from easyref.data.demo import COLOURS, PATTERNS, Subject

    words = group.rsplit("/", 1)[-1].split("-")
    pattern = words[0] if words[0] in PATTERNS else "solid"
    colour, shape = words[-2], words[-1]
    if colour not in COLOURS:
        raise ValueError(f"group {group!r} is not a demo catalogue subject (colour-shape or pattern-colour-shape)")
    return Subject(colour, shape, pattern)


def ask(clip, image: Image.Image, subject, palette, grounds) -> dict[str, bool]:
    """The three questions of the module docstring for one image."""
    from easyref.data.demo import PATTERN_WORDS, PATTERNS, SHAPES
    from easyref.metrics import named_colour

    embedding = clip.embed_images([image])[0]

    def picks(options: list[str], answers: tuple[str, ...], truth: str) -> bool:
        return answers[int((clip.embed_texts(options) @ embedding).argmax())] == truth

    word = PATTERN_WORDS[subject.pattern]
    return {
        "colour": named_colour(image, palette, grounds) == subject.colour,
        "shape": picks([f"a {word}{subject.colour} {s}" for s in SHAPES], SHAPES, subject.shape),
        "pattern": picks([f"a {PATTERN_WORDS[p]}{subject.colour} {subject.shape}" for p in PATTERNS], PATTERNS,
                         subject.pattern),
    }


def main() -> None:
    args = demo_arguments(__doc__)
    from easyref.evaluate.samples import ImageStore
    from easyref.metrics import ClipEmbedder
    from easyref.stats import bootstrap_over_groups

    root = args.demo
    config, table = demo_outputs(root)
    palette = {name: tuple(rgb) for name, rgb in config.palette.items()}
    grounds = [tuple(rgb) for rgb in config.palette_backgrounds]
    clip = ClipEmbedder.from_pretrained(str(root / "models" / "tiny" / "clip"))
    store = ImageStore()
    for section in ("held_out", "held_in"):
        samples = demo_samples(root, section)
        hits: dict[str, list[dict[str, bool]]] = {}
        groups: dict[str, list[str]] = {}
        for sample in samples.values():
            for target in sample.targets:
                hits.setdefault("targets", []).append(ask(clip, store(target), subject_of(sample.group), palette,
                                                          grounds))
                groups.setdefault("targets", []).append(sample.group)
        for method, rows in table[table.section == section].groupby("method", sort=False):
            order = [c for c in ("sample_id", "draw") if c in rows.columns]  # every draw is an image
            for row in rows.sort_values(order, kind="stable").itertuples():
                image = Image.open(root / "outputs" / "eval" / row.image).convert("RGB")
                hits.setdefault(method, []).append(ask(clip, image, subject_of(samples[row.sample_id].group),
                                                       palette, grounds))
                groups.setdefault(method, []).append(samples[row.sample_id].group)
        print(f"{section}: share of images with their group's colour / shape / pattern (chance 0.125 / 0.167 / 0.25)")
        for method, rows in hits.items():
            rates = "  ".join(f"{sum(h[a] for h in rows) / len(rows):.2f}" for a in ASPECTS)
            print(f"  {method:18s} {rates}   ({len(rows)} images)")
        if "easyref" not in hits:
            continue
        for method in hits:
            if method in ("easyref", "targets") or groups[method] != groups["easyref"]:
                continue
            parts = []
            for aspect in ASPECTS:
                diffs = [float(a[aspect]) - float(b[aspect]) for a, b in zip(hits["easyref"], hits[method],
                                                                               strict=True)]
                ci = bootstrap_over_groups(diffs, groups["easyref"], 0.95)
                parts.append(f"{aspect} {ci.mean:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]")
            print(f"  easyref - {method:13s} " + "  ".join(parts))


if __name__ == "__main__":
    main()
