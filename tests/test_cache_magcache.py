"""MagCache: past the retention window the whole block stack is skipped while the error the
calibrated magnitude ratios predict stays small, at most max_skip_steps in a row; threshold 0
is exact; calibration is found beside the model, made by `sdinfer calibrate`, interpolated to
other step counts, and a clear error when missing; default models and stock pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdinfer
from sdinfer.cache.calibration import Calibration
from sdinfer.cache.magcache import ratios_for
from sdinfer.errors import UserError

from cache_helpers import CallCounter, assert_exact, assert_new_generation_starts_clean, tiny_transformers

PROMPT = "a red circle in the top left"
# threshold high enough that only retention and max_skip_steps decide: of 10 steps, 0 and 1
# are retained, 2-4 skipped, 5 computed, 6-8 skipped, 9 computed
EVERY_FOURTH = "magcache:threshold=100,max_skip_steps=3,retention=0.2"


def _generate(pipe, steps=10):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _flat_calibration(folder, model) -> str:
    """Magnitude ratios of 0.9 per step over 10 steps, recorded for ``model``'s class."""
    path = folder / f"{type(model).__name__}.safetensors"
    Calibration("magcache", {"ratios": torch.full((10,), 0.9)}, {"denoiser": type(model).__name__}).save(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unet", "dit"])
def test_magcache_skips_the_whole_stack_on_the_default_models(unet_pipe, dit_pipe, which):
    pipe = unet_pipe if which == "unet" else dit_pipe
    net = pipe.model.denoiser
    if which == "unet":
        first, deep = CallCounter(net.down_blocks[0].resnets[0].conv1), CallCounter(net.up_blocks[-1].resnets[0].conv1)
    else:
        first, deep = CallCounter(net.transformer_blocks[0].attn.to_q), CallCounter(net.transformer_blocks[3].attn.to_q)
    base = _generate(pipe)
    first.calls = deep.calls = 0
    handle = sdinfer.accelerate(pipe, EVERY_FOURTH)   # the shipped calibration, beside the model
    try:
        cached = _generate(pipe)
    finally:
        handle.remove()
    assert first.calls == deep.calls == 4
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(pipe), base)   # removed: exactly the uncached model


@pytest.mark.slow
def test_exact_settings_and_a_new_generation_starts_clean(unet_pipe, dit_pipe):
    for pipe, spec in [(unet_pipe, "magcache:threshold=0"), (dit_pipe, "magcache:threshold=0"),
                       (dit_pipe, "magcache:threshold=100,max_skip_steps=0")]:
        assert_exact(_generate, pipe, spec)
    assert_new_generation_starts_clean(_generate, dit_pipe, "magcache:threshold=0.5")


def test_ratios_follow_the_calibrated_magnitude_curve_at_other_step_counts():
    calibrated = np.array([1.0, 0.5, 2.0, 0.25, 4.0])
    assert np.allclose(ratios_for(calibrated, 5), calibrated)
    assert np.allclose(ratios_for(calibrated, 3), [1.0, 0.5 * 2.0, 0.25 * 4.0])   # each skips a step
    assert np.allclose(np.prod(ratios_for(calibrated, 9)), np.prod(calibrated))   # same end to end


@pytest.mark.parametrize("build", ["build_tiny_sd", "build_tiny_pixart"])
def test_magcache_in_stock_diffusers_pipelines(tmp_path, build):
    import tiny_pipelines

    pipe = getattr(tiny_pipelines, build)()
    net = pipe.unet if build == "build_tiny_sd" else pipe.transformer
    leaf = CallCounter(net.mid_block.resnets[0].conv1 if build == "build_tiny_sd"
                       else net.transformer_blocks[1].attn1.to_q)
    extra = {} if build == "build_tiny_sd" else {"use_resolution_binning": False}

    def run():
        return pipe("a red circle", num_inference_steps=10, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra).images

    base = run()
    calibration = _flat_calibration(tmp_path, net)
    for spec, calls, exact in [(EVERY_FOURTH, 4, False), ("magcache:threshold=0", 10, True)]:
        handle = sdinfer.accelerate(pipe, f"{spec},calibration={calibration}")
        leaf.calls = 0
        try:
            out = run()
        finally:
            handle.remove()
        assert leaf.calls == calls, spec
        assert torch.equal(out, base) == exact, spec
    assert torch.equal(run(), base)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_magcache_on_each_transformer_class(tmp_path, index):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    calibration = _flat_calibration(tmp_path, model)
    timesteps = torch.linspace(900.0, 10.0, 10).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, f"{EVERY_FOURTH},calibration={calibration}")   # the calibrated 10 steps
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == 4
    assert torch.equal(cached[1], base[1]) and not torch.equal(cached[2], base[2])


@pytest.mark.slow
def test_the_calibrator_runs_end_to_end(tmp_path, capsys, dit_pipe):
    from test_cli import run

    out = tmp_path / "magcache.safetensors"
    code, _, err = run(capsys, "calibrate", "--method", "magcache", "--model", "dit", "--samples", "2",
                       "--steps", "6", "--out", str(out))
    assert code == 0, err
    calibration = Calibration.load(out, "magcache")
    ratios = calibration.tensors["ratios"]
    assert ratios.shape == (6,) and ratios[0] == 1.0 and bool((ratios[1:] > 0).all())
    assert calibration.meta["denoiser"] == "SD3Transformer2DModel" and "max_branch_gap" in calibration.meta
    base = _generate(dit_pipe, steps=6)
    handle = sdinfer.accelerate(dit_pipe, f"magcache:threshold=100,calibration={out}")
    try:
        assert not torch.equal(_generate(dit_pipe, steps=6), base)
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("magcache:threshold=-1", "magcache threshold must be >= 0"),
    ("magcache:max_skip_steps=1.5", "magcache max_skip_steps must be a whole number >= 0"),
    ("magcache:max_skip_steps=-1", "magcache max_skip_steps must be a whole number >= 0"),
    ("magcache:retention=1.5", r"magcache retention must lie in \[0, 1\]"),
    ("magcache:calibration=/no/such.safetensors", "magcache needs calibration data, and there is none at "
                                                  "/no/such.safetensors: run `sdinfer calibrate --method magcache"),
])
def test_bad_knobs_are_clear_errors(unet_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(unet_pipe, spec)


@pytest.mark.slow
def test_calibration_missing_or_of_another_model_is_a_clear_error(tmp_path, dit_pipe):
    from tiny_pipelines import build_tiny_sd

    sd = build_tiny_sd()
    with pytest.raises(UserError, match="magcache needs calibration data.*not loaded from a folder.*"
                                        "sdinfer calibrate --method magcache"):
        sdinfer.accelerate(sd, "magcache")
    other = _flat_calibration(tmp_path, sd.unet)
    with pytest.raises(UserError, match="recorded on a UNet2DConditionModel, not on this SD3Transformer2DModel"):
        sdinfer.accelerate(dit_pipe, f"magcache:calibration={other}")
