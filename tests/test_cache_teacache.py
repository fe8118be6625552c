"""TeaCache: the whole block stack is skipped while the rescaled change of the first block's
modulated input stays small; threshold 0 is exact; calibration is found beside the model, made
by `sdinfer calibrate` and a clear error when missing; default models and stock pipelines."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache.calibration import Calibration
from sdinfer.errors import UserError
from sdinfer.models.adapters import ADAPTERS, BlockGroup, ModelAdapter

from cache_helpers import CallCounter, assert_exact, assert_new_generation_starts_clean, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=10):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _identity_calibration(folder, model) -> str:
    """A calibration whose polynomial is p(rel) = rel, recorded for ``model``'s class."""
    path = folder / f"{type(model).__name__}.safetensors"
    Calibration("teacache", {"coefficients": torch.tensor([1.0, 0.0], dtype=torch.float64),
                             "fitted_range": torch.tensor([0.0, 10.0], dtype=torch.float64)},
                {"denoiser": type(model).__name__}).save(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unet", "dit"])
def test_teacache_skips_the_whole_stack_on_the_default_models(unet_pipe, dit_pipe, which):
    pipe = unet_pipe if which == "unet" else dit_pipe
    net = pipe.model.denoiser
    if which == "unet":
        first, deep = CallCounter(net.down_blocks[0].resnets[0].conv1), CallCounter(net.mid_block.resnets[0].conv1)
    else:
        first, deep = CallCounter(net.transformer_blocks[0].attn.to_q), CallCounter(net.transformer_blocks[3].attn.to_q)
    base = _generate(pipe)
    first.calls = deep.calls = 0
    handle = sdinfer.accelerate(pipe, "teacache:threshold=0.5")   # the shipped calibration, beside the model
    try:
        cached = _generate(pipe)
    finally:
        handle.remove()
    assert first.calls == deep.calls   # nothing of the stack runs on a skipped step
    assert 2 <= first.calls < 10       # first and last computed; measured 5 (unet) and 3 (dit) of 10
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(pipe), base)   # removed: exactly the uncached model


@pytest.mark.slow
def test_threshold_zero_is_exact_and_a_new_generation_starts_clean(unet_pipe, dit_pipe):
    for pipe in (unet_pipe, dit_pipe):
        assert_exact(_generate, pipe, "teacache:threshold=0")
    assert_new_generation_starts_clean(_generate, dit_pipe, "teacache:threshold=0.5")


@pytest.mark.parametrize("build", ["build_tiny_sd", "build_tiny_pixart"])
def test_teacache_in_stock_diffusers_pipelines(tmp_path, build):
    import tiny_pipelines

    pipe = getattr(tiny_pipelines, build)()
    net = pipe.unet if build == "build_tiny_sd" else pipe.transformer
    leaf = CallCounter(net.mid_block.resnets[0].conv1 if build == "build_tiny_sd"
                       else net.transformer_blocks[1].attn1.to_q)
    extra = {} if build == "build_tiny_sd" else {"use_resolution_binning": False}

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra).images

    base = run()
    calibration = _identity_calibration(tmp_path, net)
    for threshold, calls, exact in [(100.0, 2, False), (0.0, 6, True)]:   # 100: only the first and last step
        handle = sdinfer.accelerate(pipe, f"teacache:threshold={threshold},calibration={calibration}")
        leaf.calls = 0
        try:
            out = run()
        finally:
            handle.remove()
        assert leaf.calls == calls, threshold
        assert torch.equal(out, base) == exact, threshold
    assert torch.equal(run(), base)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_teacache_on_each_transformer_class(tmp_path, index):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    calibration = _identity_calibration(tmp_path, model)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        for threshold, computed in [(100.0, 1), (0.0, 6)]:   # no known last step outside a pipeline
            handle = sdinfer.accelerate(model, f"teacache:threshold={threshold},calibration={calibration}")
            counter.calls = 0
            try:
                cached = [call(t) for t in timesteps]
            finally:
                handle.remove()
            assert counter.calls == computed
            assert torch.equal(cached[0], base[0])
            assert torch.equal(cached[-1], base[-1]) == (computed == 6)


@pytest.mark.slow
def test_the_calibrator_runs_end_to_end(tmp_path, capsys, dit_pipe):
    from test_cli import run

    out = tmp_path / "teacache.safetensors"
    code, stdout, err = run(capsys, "calibrate", "--method", "teacache", "--model", "dit", "--samples", "2",
                            "--steps", "6", "--out", str(out))
    assert code == 0, err
    calibration = Calibration.load(out, "teacache")
    assert calibration.tensors["coefficients"].shape == (5,)   # a quartic
    low, high = calibration.tensors["fitted_range"]
    assert 0 < low < high
    assert calibration.meta["denoiser"] == "SD3Transformer2DModel" and calibration.meta["pairs"] == 2 * 2 * 5
    handle = sdinfer.accelerate(dit_pipe, f"teacache:calibration={out}")
    handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("teacache:threshold=-0.1", "teacache threshold must be >= 0"),
    ("teacache:threshold=x", "teacache option threshold='x' is not a float"),
    ("teacache:calibration=/no/such.safetensors", "teacache needs calibration data, and there is none at "
                                                  "/no/such.safetensors: run `sdinfer calibrate --method teacache"),
])
def test_bad_knobs_are_clear_errors(dit_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(dit_pipe, spec)


@pytest.mark.slow
def test_calibration_missing_or_of_another_model_is_a_clear_error(tmp_path, unet_pipe):
    from tiny_pipelines import build_tiny_pixart

    pixart = build_tiny_pixart()
    with pytest.raises(UserError, match="teacache needs calibration data.*not loaded from a folder.*"
                                        "sdinfer calibrate --method teacache"):
        sdinfer.accelerate(pixart, "teacache")
    other = _identity_calibration(tmp_path, pixart.transformer)
    with pytest.raises(UserError, match="recorded on a PixArtTransformer2DModel, not on this UNet2DConditionModel"):
        sdinfer.accelerate(unet_pipe, f"teacache:calibration={other}")


def test_a_model_without_a_declared_modulation_names_the_supported_classes(monkeypatch):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    monkeypatch.setitem(ADAPTERS, "Plain", ModelAdapter("dit", (BlockGroup("layers"),)))
    with pytest.raises(UserError, match="teacache supports models whose adapter declares.*SD3Transformer2DModel"):
        sdinfer.accelerate(Plain(), "teacache")
