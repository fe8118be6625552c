import numpy as np
import pytest

from sdinfer.eval.adherence import adherence_rate, adheres, detect, parse_caption
from sdinfer.models.default import shapes


def test_dataset_is_seeded_and_excludes_heldout():
    a, ca, _ = shapes.make_dataset(50, seed=3)
    b, cb, _ = shapes.make_dataset(50, seed=3)
    assert np.array_equal(a, b) and ca == cb
    _, captions, _ = shapes.make_dataset(3000, seed=4)
    held = set(shapes.heldout_prompts())
    assert len(held) == 200 and not held & set(captions)
    assert held <= set(shapes.all_captions())


def test_heldout_covers_every_kind_colour_position():
    facts = {(f.kind, f.colour, f.position) for f in map(parse_caption, shapes.heldout_prompts())}
    assert len(facts) == len(shapes.KINDS) * len(shapes.COLOURS) * len(shapes.POSITIONS)


@pytest.fixture(scope="module")
def data():
    images, captions, specs = shapes.make_dataset(1000, seed=2024, exclude_heldout=False)
    return images, captions, specs


def test_checker_accepts_true_captions(data):
    images, captions, _ = data
    assert adherence_rate(images, captions) >= 0.98


def test_checker_rejects_wrong_captions(data):
    images, _, specs = data
    rng = np.random.default_rng(0)
    accepted = 0
    for image, s in zip(images, specs):
        kind, colour, position = s.kind, s.colour, s.position
        which = rng.integers(3)
        if which == 0:
            kind = rng.choice([k for k in shapes.KINDS if k != kind])
        elif which == 1:
            colour = rng.choice([c for c in shapes.COLOURS if c != colour])
        else:
            position = rng.choice([p for p in shapes.POSITIONS if p != position])
        accepted += adheres(image, shapes.make_caption(kind, colour, position))
    assert accepted / len(images) <= 0.10


def test_blank_image_and_uncheckable_caption():
    blank = np.full((32, 32, 3), 120, np.uint8)
    assert detect(blank).kind is None
    assert adheres(blank, "a red circle in the top left") is False
    assert adheres(blank, "a photo of a cat") is None
    assert adherence_rate([blank], ["a photo of a cat"]) is None
