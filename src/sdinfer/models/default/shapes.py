"""The procedural "shapes" data set the default models are trained on.

One shape per image (circle, square or triangle) in one of four colours, at one
of five positions, in two sizes, on a plain background.  Each image has an
English caption naming kind, colour and position, and optionally size and
background: "a small red circle in the top left on a white background".

Everything is seeded: the same seed gives the same images and captions.  A
fixed set of full caption strings is held out of training (``heldout_prompts``)
so that the adherence benchmark measures prompts the model never saw.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

RESOLUTION = 32

KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
}
BACKGROUNDS = {
    "black": (18, 18, 22),
    "gray": (105, 105, 110),
    "white": (238, 238, 238),
    "beige": (205, 190, 155),
}
# Centres in fractions of the image side (x, y), y growing downwards.
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.15, "large": 0.22}  # half-extent as a fraction of the side
JITTER = 0.05  # centre jitter, fraction of the side

VOCABULARY = (
    ["a", "in", "the", "on", "background"]
    + list(SIZES)
    + list(COLOURS)
    + list(KINDS)
    + ["top", "bottom", "left", "right", "center"]
    + list(BACKGROUNDS)
)


@dataclass(frozen=True)
class ShapeSpec:
    kind: str
    colour: str
    position: str
    size: str
    background: str
    name_size: bool
    name_background: bool

    @property
    def caption(self) -> str:
        return make_caption(self.kind, self.colour, self.position,
                            self.size if self.name_size else None,
                            self.background if self.name_background else None)


def make_caption(kind: str, colour: str, position: str, size: str | None = None,
                 background: str | None = None) -> str:
    words = ["a"] + ([size] if size else []) + [colour, kind]
    words += ["in", "the", position]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def all_captions() -> list[str]:
    """Every caption the grammar can produce (900 strings)."""
    out = []
    for kind, colour, position in itertools.product(KINDS, COLOURS, POSITIONS):
        for size in (None, *SIZES):
            for bg in (None, *BACKGROUNDS):
                out.append(make_caption(kind, colour, position, size, bg))
    return out


def heldout_prompts(n: int = 200, seed: int = 1234) -> list[str]:
    """The held-out prompt set: ``n`` caption strings never used in training.

    Every (kind, colour, position) triple is covered before any repeats, so
    the set is balanced over what the adherence checker measures.
    """
    rng = np.random.default_rng(seed)
    triples = list(itertools.product(KINDS, COLOURS, POSITIONS))
    out: list[str] = []
    while len(out) < n:
        for i in rng.permutation(len(triples)):
            kind, colour, position = triples[i]
            size = [None, *SIZES][rng.integers(3)]
            bg = [None, *BACKGROUNDS][rng.integers(5)]
            caption = make_caption(kind, colour, position, size, bg)
            if caption not in out:
                out.append(caption)
            if len(out) == n:
                break
    return out


def sample_specs(n: int, seed: int, exclude: set[str] | None = None) -> list[ShapeSpec]:
    """Balanced random specs; captions in ``exclude`` get other optional words."""
    rng = np.random.default_rng(seed)
    exclude = exclude or set()
    specs = []
    for _ in range(n):
        while True:
            bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            spec = ShapeSpec(
                kind=KINDS[rng.integers(len(KINDS))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                size=list(SIZES)[rng.integers(len(SIZES))],
                background=bg,
                name_size=bool(rng.random() < 0.5),
                name_background=bool(rng.random() < 0.5),
            )
            if spec.caption not in exclude:
                break
        specs.append(spec)
    return specs


_SUPERSAMPLE = 4


def _shape_mask(kind: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a res x res grid."""
    n = res * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if kind == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif kind == "square":
        s = r * 0.886  # same area as the circle of radius r
        inside = (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    elif kind == "triangle":
        h = r * 1.15  # upward-pointing triangle, apex at top
        top, bottom = cy - h, cy + h * 0.8
        frac = np.clip((y - top) / (bottom - top), 0.0, 1.0)
        half_width = frac * h * 1.15
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(KINDS)}")
    return inside.reshape(res, _SUPERSAMPLE, res, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, rng: np.random.Generator, res: int = RESOLUTION) -> np.ndarray:
    """One image, uint8 HxWx3."""
    fx, fy = POSITIONS[spec.position]
    cx = (fx + rng.uniform(-JITTER, JITTER)) * res
    cy = (fy + rng.uniform(-JITTER, JITTER)) * res
    r = SIZES[spec.size] * res * rng.uniform(0.9, 1.1)
    mask = _shape_mask(spec.kind, cx, cy, r, res)[..., None]
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    fg = np.array(COLOURS[spec.colour], dtype=np.float32)
    img = bg * (1 - mask) + fg * mask
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_dataset(n: int, seed: int, res: int = RESOLUTION,
                 exclude_heldout: bool = True) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """``n`` images (uint8, N x H x W x 3), their captions and specs."""
    exclude = set(heldout_prompts()) if exclude_heldout else set()
    specs = sample_specs(n, seed, exclude)
    rng = np.random.default_rng(seed + 1)
    images = np.stack([render(s, rng, res) for s in specs])
    return images, [s.caption for s in specs], specs
