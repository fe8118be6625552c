"""Prompt sets for benchmarks: ``quick``, ``heldout`` (200 unseen captions) or a file."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models.default.shapes import heldout_prompts

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


def load_prompts(spec: str) -> list[str]:
    if spec == "quick":
        return list(QUICK)
    if spec == "heldout":
        return heldout_prompts()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"prompt set {spec!r} is neither 'quick', 'heldout' nor a file; "
                        "pass one of those or a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
