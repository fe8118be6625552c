"""Prompt adherence on the shapes data: does an image show what its caption names?

A classical, deterministic checker (no learned weights):
1. the background colour is the median of the image's outer ring of pixels;
2. each pixel's coverage is its colour distance to the background, relative to
   the most distant pixel; pixels above one half form the shape;
3. colour: the mean of the strongly covered pixels, nearest palette colour;
4. position: the coverage-weighted centroid, nearest of the five anchors;
5. kind: triangles are bottom-heavy (upper half of the bounding box holds
   much less coverage than the lower half); of the rest, squares fill the
   corners of their bounding box, circles leave them empty.
The caption is parsed for its colour, kind and position words; all three must
match.  Its accuracy is measured by a test on data-set images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..models.default import shapes

_COLOURS = np.array(list(shapes.COLOURS.values()), dtype=np.float32)
_COLOUR_NAMES = list(shapes.COLOURS)
_POSITION_NAMES = list(shapes.POSITIONS)
MIN_CONTRAST = 60.0   # RGB distance between shape and background below which no shape is seen
MIN_AREA = 6.0        # pixels of coverage


@dataclass(frozen=True)
class Detection:
    kind: str | None
    colour: str | None
    position: str | None


@dataclass(frozen=True)
class CaptionFacts:
    kind: str
    colour: str
    position: str


def parse_caption(caption: str) -> CaptionFacts | None:
    """The kind, colour and position a caption names, or None if it names no such triple."""
    text = " ".join(caption.lower().split())
    kind = next((k for k in shapes.KINDS if re.search(rf"\b{k}\b", text)), None)
    colour = next((c for c in shapes.COLOURS if re.search(rf"\b{c}\b", text)), None)
    position = next((p for p in sorted(shapes.POSITIONS, key=len, reverse=True)
                     if re.search(rf"\b{p}\b", text)), None)
    if kind is None or colour is None or position is None:
        return None
    return CaptionFacts(kind, colour, position)


def detect(image) -> Detection:
    """What the image shows: kind, colour and position of its shape (None where unclear)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {img.shape}")
    h, w, _ = img.shape
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(ring, axis=0)
    dist = np.linalg.norm(img - bg, axis=2)
    peak = float(dist.max())
    if peak < MIN_CONTRAST:
        return Detection(None, None, None)
    cover = np.clip(dist / peak, 0.0, 1.0)
    cover[cover < 0.25] = 0.0
    if cover.sum() < MIN_AREA:
        return Detection(None, None, None)
    core = cover > 0.75
    colour = _COLOUR_NAMES[int(np.argmin(np.linalg.norm(_COLOURS - img[core].mean(0), axis=1)))]

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    total = cover.sum()
    cx, cy = (cover * xs).sum() / total / w, (cover * ys).sum() / total / h
    anchors = np.array(list(shapes.POSITIONS.values()))
    position = _POSITION_NAMES[int(np.argmin(np.linalg.norm(anchors - [cx, cy], axis=1)))]

    rows = np.where((cover > 0.5).any(axis=1))[0]
    cols = np.where((cover > 0.5).any(axis=0))[0]
    if len(rows) < 2 or len(cols) < 2:
        return Detection(None, colour, position)
    box = cover[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = box.sum() / box.size
    half = box.shape[0] // 2
    top, bottom = box[:half].sum(), box[box.shape[0] - half:].sum()
    corners = np.mean([box[:2, :2].mean(), box[:2, -2:].mean(), box[-2:, :2].mean(),
                       box[-2:, -2:].mean()])
    if top < 0.6 * bottom:
        kind = "triangle"
    elif corners > 0.45 or fill > 0.92:
        kind = "square"
    else:
        kind = "circle"
    return Detection(kind, colour, position)


def adheres(image, caption: str) -> bool | None:
    """True if the image shows the caption's kind, colour and position; None if the
    caption names no kind / colour / position triple of the shapes vocabulary."""
    facts = parse_caption(caption)
    if facts is None:
        return None
    d = detect(image)
    return (d.kind, d.colour, d.position) == (facts.kind, facts.colour, facts.position)


def adherence_rate(images, captions: list[str]) -> float | None:
    """Fraction of checkable (image, caption) pairs that adhere; None if none is checkable."""
    results = [adheres(im, c) for im, c in zip(images, captions)]
    checked = [r for r in results if r is not None]
    return float(np.mean(checked)) if checked else None
