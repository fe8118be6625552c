"""Prompt sets for benchmarks: ``quick``, ``heldout`` (200 unseen captions), ``validation`` (200
captions of the training grammar, none of them held out: what ``sdinfer tune`` chooses on) or a
file."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models.default.shapes import COLOURS, KINDS, POSITIONS, heldout_prompts, make_caption

VALIDATION_SEED = 20_201   # not the held-out set's 1234

QUICK = [
    "a red circle in the top left",
    "a blue square in the bottom right",
    "a yellow triangle in the center",
    "a small green circle in the top right on a black background",
    "a large red square in the bottom left",
    "a blue triangle in the top left on a white background",
    "a green square in the center on a beige background",
    "a small yellow circle in the bottom right on a gray background",
]


def validation_prompts(n: int = 200, seed: int = VALIDATION_SEED) -> list[str]:
    """``n`` captions of the shapes grammar that the held-out set does not contain (so a choice
    made on them is checked on other prompts), balanced as the held-out set: every (kind, colour,
    position) triple before any repeats, the size and background words drawn with ``seed``."""
    import itertools

    import numpy as np

    from ..models.default.shapes import BACKGROUNDS, SIZES

    heldout = set(heldout_prompts())
    triples = list(itertools.product(KINDS, COLOURS, POSITIONS))
    most = len(triples) * (1 + len(SIZES)) * (1 + len(BACKGROUNDS)) - len(heldout)
    if not 1 <= n <= most:
        raise UserError(f"the validation set holds 1 to {most} prompts, not {n}")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen = set(heldout)
    while len(out) < n:
        for i in rng.permutation(len(triples)):
            kind, colour, position = triples[i]
            for _ in range(20):   # a few draws of the optional words before the triple is passed over
                size = [None, *SIZES][rng.integers(1 + len(SIZES))]
                bg = [None, *BACKGROUNDS][rng.integers(1 + len(BACKGROUNDS))]
                caption = make_caption(kind, colour, position, size, bg)
                if caption not in seen:
                    seen.add(caption)
                    out.append(caption)
                    break
            if len(out) == n:
                break
    return out


def load_prompts(spec: str) -> list[str]:
    if spec == "quick":
        return list(QUICK)
    if spec == "heldout":
        return heldout_prompts()
    if spec == "validation":
        return validation_prompts()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"prompt set {spec!r} is neither 'quick', 'heldout', 'validation' nor a file; "
                        "pass one of those or a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
