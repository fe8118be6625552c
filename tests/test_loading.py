import json
import shutil

import pytest
import torch

from sdinfer.errors import UserError
from sdinfer.models.loading import load_model
from sdinfer.pipeline import Pipeline


@pytest.mark.slow
def test_default_models_load_offline():
    for name in ("default", "unet", "dit"):
        m = load_model(name)
        assert m.text_encoder is not None and m.tokenizer is not None
        assert m.native_size == 32 and m.prediction_type == "v_prediction"
    assert load_model("default").family == "UNet2DConditionModel"
    assert load_model("dit").family == "SD3Transformer2DModel"


@pytest.mark.parametrize("name, family", [("unet-64", "UNet2DConditionModel"), ("dit-64", "SD3Transformer2DModel")])
def test_fine_tuned_64_models_draw_at_64_by_default(name, family):
    pipe = Pipeline.from_pretrained(name)
    assert pipe.model.family == family and pipe.model.native_size == 64
    out = pipe(["a red circle in the top left"], steps=2)
    assert out.pixels.shape == (1, 3, 64, 64) and torch.isfinite(out.pixels).all()


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_pixart"])
def test_saved_diffusers_pipelines_generate(fixture, request):
    path = request.getfixturevalue(fixture)
    pipe = Pipeline.from_pretrained(path)
    assert pipe.model.vae is not None
    out = pipe(["a red circle", "a blue square"], steps=3, guidance_scale=2.0, size=16)
    assert out.pixels.shape == (2, 3, 16, 16) and torch.isfinite(out.pixels).all()
    again = pipe(["a red circle", "a blue square"], steps=3, guidance_scale=2.0, size=16)
    assert torch.equal(out.pixels, again.pixels)
    assert out.nfe == 3


@pytest.mark.slow
def test_image_does_not_depend_on_batch(default_pipe):
    alone = default_pipe(["a red circle in the top left"], steps=4, seeds=[11])
    batched = default_pipe(["a blue square in the center", "a red circle in the top left"],
                           steps=4, seeds=[10, 11])
    torch.testing.assert_close(alone.pixels[0], batched.pixels[1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_unknown_words_warn_by_name(default_pipe):
    with pytest.warns(UserWarning, match="zebra"):
        default_pipe(["a zebra circle in the top left"], steps=2)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_are_refused(tiny_sd, tmp_path):
    path = _copy(tiny_sd, tmp_path)
    weights = next((path / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(path)


def test_non_safetensors_weights_are_refused(tiny_sd, tmp_path):
    path = _copy(tiny_sd, tmp_path)
    weights = next((path / "unet").glob("*.safetensors"))
    weights.write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors" * 10)
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(path)


def test_pickled_weights_are_refused(tiny_sd, tmp_path):
    path = _copy(tiny_sd, tmp_path)
    for w in (path / "unet").glob("*.safetensors"):
        w.rename(w.with_suffix(".bin"))
    with pytest.raises(UserError, match="safetensors only"):
        load_model(path)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a diffusers model"):
        load_model(tmp_path)


def test_bare_model_folder_names_the_fix(tiny_sd):
    with pytest.raises(UserError, match="model_index.json"):
        load_model(tiny_sd / "unet")


def test_unknown_name_and_missing_path():
    with pytest.raises(UserError, match="neither a shipped model"):
        load_model("sdxl-turbo-please")


def test_broken_model_index(tiny_sd, tmp_path):
    path = _copy(tiny_sd, tmp_path)
    (path / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model(path)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    with pytest.raises(UserError, match="no unet or transformer"):
        load_model(path)


@pytest.mark.slow
def test_nan_weights_give_a_clear_error(default_pipe):
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline(default_pipe.model)
    net = pipe.model.denoiser
    saved = net.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            net.conv_out.bias.fill_(float("nan"))
        with pytest.raises(UserError, match="NaN"):
            pipe(["a red circle in the top left"], steps=2)
    finally:
        with torch.no_grad():
            net.conv_out.bias.copy_(saved)
