"""Write a small synthetic group dataset that a tiny model can learn from on a CPU.

Every group is one distinctive subject (a shape in a colour with a surface pattern) drawn 4-10 times at random
positions, sizes, rotations and on varied backgrounds, each image with its own caption. As in the paper's data, the
caption does not always say what the group shares: a share of captions leave out the colour
(:data:`OMIT_COLOUR`) or the pattern (:data:`OMIT_PATTERN`), which only the reference images then show. Every
colour x shape combination is one group, so a held-out group is a combination that training never saw. The layout
is the input layout of real folder sources, so the result goes through ``easyref ingest`` like anything else:

    OUT/<group>/<NNN>.png     e.g. OUT/red-star/000.png
    OUT/captions.jsonl        {"image": "red-star/000.png", "caption": "a red star ..."} per line

The output is byte-identical for the same ``--seed`` and ``--size``; a group's images depend only on the seed and
the group's position in the catalogue.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

HELP = "write the synthetic demo group dataset (folder layout + captions.jsonl)"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "blue": (30, 70, 210),
    "green": (30, 150, 60),
    "yellow": (240, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "teal": (0, 140, 140),
    "brown": (120, 70, 30),
}
SHAPES = ("star", "circle", "square", "triangle", "hexagon", "cross")
PATTERNS = ("solid", "striped", "dotted", "checkered")
PATTERN_WORDS = {"solid": "", "striped": "striped ", "dotted": "polka-dot ", "checkered": "checkered "}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "cream": (250, 240, 215),
    "light grey": (215, 215, 215),
    "pale blue": (205, 225, 250),
    "pale green": (210, 240, 210),
    "pale pink": (250, 220, 230),
    "lavender": (225, 215, 245),
    "beige": (235, 220, 195),
}
SUPERSAMPLE = 2  # draw at 2x and downsample, for anti-aliased edges
OMIT_COLOUR = 0.4  # share of captions that do not name the subject's colour ("a small striped star ...")
OMIT_PATTERN = 0.3  # share of captions that do not name its pattern (drawn independently)


@dataclass(frozen=True)
class Subject:
    """One group's subject: what every image of the group shows."""

    colour: str
    shape: str
    pattern: str

    @property
    def slug(self) -> str:
        """The group folder name, e.g. ``red-star`` or ``striped-blue-circle``."""
        prefix = "" if self.pattern == "solid" else f"{self.pattern}-"
        return f"{prefix}{self.colour}-{self.shape}"

    @property
    def noun(self) -> str:
        return self.describe()

    def describe(self, *, colour: bool = True, pattern: bool = True) -> str:
        """``polka-dot red star``; without ``colour`` / ``pattern`` that word is left out (``polka-dot star``)."""
        words = [PATTERN_WORDS[self.pattern].strip() if pattern else "", self.colour if colour else "", self.shape]
        return " ".join(w for w in words if w)


PATTERN_SETS = ("one", "all")


def catalogue(patterns: str = "one") -> list[Subject]:
    """The demo's subjects. ``one``: every colour x shape, each with one pattern (``red-star`` is plain): 48
    subjects, the catalogue the tiny parts are pretrained on. ``all``: every colour x shape x pattern, 192 subjects;
    the 144 beyond ``one`` combine a colour, shape and pattern that the ``one`` catalogue keeps apart."""
    if patterns not in PATTERN_SETS:
        raise ValueError(f"patterns must be one of {', '.join(PATTERN_SETS)}, got {patterns!r}")
    subjects = []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            if patterns == "all":
                subjects += [Subject(colour, shape, pattern) for pattern in PATTERNS]
            else:
                subjects.append(Subject(colour, shape, PATTERNS[(ci + 2 * si) % len(PATTERNS)]))
    return subjects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/raw")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--min-images", type=int, default=4, help="fewest images per group (default 4)")
    parser.add_argument("--max-images", type=int, default=10, help="most images per group (default 10)")
    parser.add_argument(
        "--omit-colour", type=float, default=OMIT_COLOUR,
        help=f"share of captions that leave out the subject's colour, which then only the references show (default "
        f"{OMIT_COLOUR}; 1 = no caption names it, so the colour must come from the references)",
    )
    parser.add_argument(
        "--patterns", choices=PATTERN_SETS, default="one",
        help="one: every colour x shape with one pattern each, 48 groups (default); all: every colour x shape x "
        "pattern, 192 groups (more varied groups to train on)",
    )


def run(args: argparse.Namespace) -> int:
    from easyref.errors import UserError

    if args.size < 32:
        raise UserError(f"--size {args.size}: images must be at least 32 pixels wide")
    if not 3 <= args.min_images <= args.max_images:
        raise UserError(f"--min-images {args.min_images} --max-images {args.max_images}: need 3 <= min <= max")
    if not 0 <= args.omit_colour <= 1:
        raise UserError(f"--omit-colour {args.omit_colour}: a share of captions, between 0 and 1")
    n_images = write_demo_data(
        args.out, seed=args.seed, size=args.size, min_images=args.min_images, max_images=args.max_images,
        omit_colour=args.omit_colour, patterns=args.patterns,
    )
    print(f"demo-data: wrote {n_images} images in {len(catalogue(args.patterns))} groups to {args.out}")
    return 0


def write_demo_data(
    out: str | Path, *, seed: int = 0, size: int = 128, min_images: int = 4, max_images: int = 10,
    omit_colour: float = OMIT_COLOUR, patterns: str = "one",
) -> int:
    """Write the demo dataset under ``out``, one group per subject of ``catalogue(patterns)``; returns the number of
    images written. ``omit_colour`` changes the captions only: the images are the same for every value."""
    import numpy as np

    out = Path(out)
    captions: list[dict[str, str]] = []
    for index, subject in enumerate(catalogue(patterns)):
        rng = np.random.default_rng([seed, index])
        folder = out / subject.slug
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(int(rng.integers(min_images, max_images + 1))):
            image, caption = draw_image(subject, rng, size, omit_colour=omit_colour)
            name = f"{subject.slug}/{i:03d}.png"
            image.save(out / name, format="PNG")
            captions.append({"image": name, "caption": caption})
    with open(out / "captions.jsonl", "w") as f:
        for row in sorted(captions, key=lambda r: r["image"]):
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return len(captions)


def draw_image(
    subject: Subject, rng: np.random.Generator, size: int, *, full_caption: bool = False,
    omit_colour: float = OMIT_COLOUR,
) -> tuple[Image.Image, str]:
    """One image of ``subject`` at a random place, size and rotation on a random background, with its caption.

    The caption leaves out the colour or the pattern as often as ``omit_colour`` / :data:`OMIT_PATTERN` say,
    unless ``full_caption`` (the draws are made either way, so the image and later draws do not change).
    """
    from PIL import Image

    big = size * SUPERSAMPLE
    background, background_words = _background(rng, big)
    radius = float(rng.uniform(0.16, 0.36)) * big
    cx = float(rng.uniform(radius, big - radius))
    cy = float(rng.uniform(radius, big - radius))
    angle = float(rng.uniform(0, 2 * math.pi))
    mask = _shape_mask(subject.shape, big, cx, cy, radius, angle)
    texture = _texture(subject, big, rng)
    background.paste(texture, (0, 0), mask)
    image = background.resize((size, size), Image.Resampling.LANCZOS)
    keep_colour, keep_pattern = rng.random() >= omit_colour, rng.random() >= OMIT_PATTERN
    noun = subject.describe(colour=keep_colour or full_caption, pattern=keep_pattern or full_caption)
    caption = f"a {_size_word(radius / big)} {noun} {_position_words(cx / big, cy / big)} on {background_words}"
    return image, caption


def _background(rng: np.random.Generator, big: int) -> tuple[Image.Image, str]:
    from PIL import Image

    names = list(BACKGROUNDS)
    first, second = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    if rng.random() < 0.5:
        return Image.new("RGB", (big, big), BACKGROUNDS[first]), f"a {first} background"
    top = Image.new("RGB", (big, big), BACKGROUNDS[first])
    bottom = Image.new("RGB", (big, big), BACKGROUNDS[second])
    ramp = Image.linear_gradient("L").resize((big, big))
    return Image.composite(bottom, top, ramp), f"a {first} to {second} gradient background"


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Points at evenly spaced angles around (cx, cy), the k-th at distance ``radii[k]``."""
    n = len(radii)
    return [
        (cx + r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _shape_mask(shape: str, big: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    from PIL import Image, ImageDraw

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=255)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=255)
    elif shape == "cross":
        arm = 0.36 * r
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            corners = [(s * r, t * arm) for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            draw.polygon([(cx + u * dx - v * dy, cy + u * dy + v * dx) for u, v in corners], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(subject: Subject, big: int, rng: np.random.Generator) -> Image.Image:
    """The subject's colour with its pattern drawn in a darker shade, over the whole canvas."""
    from PIL import Image, ImageDraw

    colour = COLOURS[subject.colour]
    shade = tuple(int(c * 0.45) for c in colour)
    texture = Image.new("RGB", (big, big), colour)
    draw = ImageDraw.Draw(texture)
    step = max(6, big // 12)
    offset = int(rng.integers(0, step))
    if subject.pattern == "striped":
        for x in range(-big, 2 * big, step):
            draw.polygon(
                [
                    (x + offset, 0),
                    (x + offset + step // 2, 0),
                    (x + offset + step // 2 + big, big),
                    (x + offset + big, big),
                ],
                fill=shade,
            )
    elif subject.pattern == "dotted":
        dot = step // 4
        for y in range(offset, big, step):
            for x in range(offset, big, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=shade)
    elif subject.pattern == "checkered":
        for y in range(0, big, step):
            for x in range(0, big, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=shade)
    return texture


def _size_word(relative_radius: float) -> str:
    return "small" if relative_radius < 0.23 else "medium" if relative_radius < 0.30 else "large"


def _position_words(x: float, y: float) -> str:
    row = "top" if y < 0.4 else "bottom" if y > 0.6 else ""
    column = "left" if x < 0.4 else "right" if x > 0.6 else ""
    if not row and not column:
        return "in the centre"
    if not row or not column:
        return f"on the {row or column}"
    return f"in the {row} {column}"
