"""StepSaver: per-prompt fewest steps, the predictor, and generate --steps auto."""

import pytest
import torch

from file_helpers import check_bad_files_refused
from sdinfer.cli import main
from sdinfer.errors import UserError
from sdinfer.pipeline import Pipeline
from sdinfer.stepsaver import StepPredictor, find_min_steps, prompt_features

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right"]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("unet")


@pytest.mark.slow
def test_labels_follow_the_threshold(pipe):
    easy = find_min_steps(pipe, PROMPTS, reference_steps=6, candidates=[2, 4], threshold_db=0.0)
    assert easy.steps == [2, 2, 2]
    impossible = find_min_steps(pipe, PROMPTS, reference_steps=6, candidates=[2, 4], threshold_db=101.0)
    assert impossible.steps == [6, 6, 6]
    mid = find_min_steps(pipe, PROMPTS, reference_steps=6, candidates=[2, 4], threshold_db=25.0)
    for s, q in zip(mid.steps, mid.psnr_db):
        assert s in (2, 4, 6) and (s == 6 or q >= 25.0)


def test_predictor_learns_separable_labels_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=g)
    steps = [5 if f[0] < 0 else 20 for f in features]
    predictor = StepPredictor.fit(features, steps, [5, 10, 20, 50], ridge=1e-3)
    predicted = predictor.predict(features)
    assert sum(p >= s for p, s in zip(predicted, steps)) >= 55   # rounded up: misses err high
    few = [p for p, s in zip(predicted, steps) if s == 5]
    many = [p for p, s in zip(predicted, steps) if s == 20]
    assert sum(few) / len(few) < 10 < sum(many) / len(many)      # it learned which prompts need more
    predictor.save(tmp_path / "p.safetensors")
    again = StepPredictor.load(tmp_path / "p.safetensors")
    assert again.predict(features) == predicted


def test_predictor_files_are_checked(tmp_path):
    check_bad_files_refused(StepPredictor.load, tmp_path, "does not exist", "not an sdinfer step predictor",
                            "not a readable safetensors", error=UserError, missing_error=UserError)


@pytest.mark.slow
def test_auto_steps_without_a_predictor_is_a_clear_error(pipe, monkeypatch):
    import sdinfer.stepsaver as stepsaver

    monkeypatch.setattr(stepsaver, "KIND", "no-such-predictor")
    with pytest.raises(UserError, match="needs a step predictor"):
        pipe(PROMPTS[:1], steps="auto")


@pytest.mark.slow
def test_bench_min_steps_then_generate_auto(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    predictor = tmp_path / "stepsaver.safetensors"
    assert main(["bench", "--min-steps", "--model", "unet", "--prompts", str(prompts), "--steps", "2,4",
                 "--baseline", "ddim:6", "--threshold", "20", "--save-predictor", str(predictor),
                 "--json", str(tmp_path / "labels.json")]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and predictor.exists()
    png = tmp_path / "auto.png"
    assert main(["generate", PROMPTS[0], "--steps", "auto", "--predictor", str(predictor), "-o", str(png),
                 "--quiet"]) == 0
    from PIL import Image
    assert int(Image.open(png).text["steps"]) in (2, 4, 6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_the_default_models_ship_a_predictor_for_auto_steps(pipe, model):
    from sdinfer.models.default import shapes
    from sdinfer.stepsaver import CANDIDATES, predictor_for

    pipe = pipe if model == "unet" else Pipeline.from_pretrained(model)
    counts = predictor_for(pipe).predict(prompt_features(pipe, shapes.heldout_prompts()[:50]))
    assert set(counts) <= set(CANDIDATES) | {50} and len(set(counts)) > 1   # it tells prompts apart
    assert pipe(PROMPTS[:1], steps="auto", seeds=[0]).pixels.shape[0] == 1


@pytest.mark.slow
def test_features_have_one_row_per_prompt(pipe):
    assert prompt_features(pipe, PROMPTS).shape[0] == 3
