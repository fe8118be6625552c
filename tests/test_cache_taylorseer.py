"""TaylorSeer: the forecast sub-layers (DiT) and deep path (UNet) really are skipped, interval 1 is
exact, order 0 is FORA / DeepCache, the Taylor series forecasts polynomials exactly, state is per
generation, removal restores the model; on the default models and on stock diffusers pipelines."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache.taylorseer import TaylorSeries
from sdinfer.errors import UserError

from cache_helpers import CallCounter, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=7):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _cached(pipe, spec, steps=7):
    handle = sdinfer.accelerate(pipe, spec)
    try:
        return _generate(pipe, steps)
    finally:
        handle.remove()


@pytest.mark.parametrize("order", [1, 2])
def test_the_series_forecasts_a_linear_feature_exactly(order):
    series = TaylorSeries(order)
    for step in (0, 1, 4):   # uneven gaps: the warmup, then the interval
        series.update((torch.full((2,), 3.0 + 0.5 * step), None), step)
    forecast, absent = series.forecast(7)
    assert absent is None
    torch.testing.assert_close(forecast, torch.full((2,), 3.0 + 0.5 * 7))


def test_the_second_factor_is_the_second_derivative_on_even_gaps():
    series = TaylorSeries(2)
    for step in (1, 4, 7):
        series.update(torch.tensor([0.25 * step ** 2]), step)
    assert torch.allclose(series.factors[0][2], torch.tensor([0.5]))


def test_order_0_keeps_the_feature_itself():
    series = TaylorSeries(0)
    feature = torch.randn(3)
    series.update(feature, 2)
    series.update(feature + 1, 5)
    assert torch.equal(series.forecast(9), feature + 1)


@pytest.mark.slow
def test_taylorseer_forecasts_the_sublayers_on_the_default_dit(dit_pipe):
    block = dit_pipe.model.denoiser.transformer_blocks[1]
    attn, mlp = CallCounter(block.attn.to_q), CallCounter(block.ff.net[0])
    base = _generate(dit_pipe, steps=10)
    attn.calls = mlp.calls = 0
    cached = _cached(dit_pipe, "taylorseer:interval=3,warmup=2,order=1", steps=10)
    assert (attn.calls, mlp.calls) == (6, 6)   # steps 0, 1, then 2, 5, 8 and the last (9)
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(dit_pipe, steps=10), base)   # removed: exactly the uncached model


@pytest.mark.slow
def test_taylorseer_forecasts_the_deep_path_on_the_default_unet(unet_pipe):
    net = unet_pipe.model.denoiser
    deep, shallow = CallCounter(net.mid_block.resnets[0]), CallCounter(net.down_blocks[0].resnets[0])
    base = _generate(unet_pipe, steps=10)
    deep.calls = shallow.calls = 0
    cached = _cached(unet_pipe, "taylorseer:interval=3,warmup=2", steps=10)
    assert (deep.calls, shallow.calls) == (6, 10)
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(unet_pipe, steps=10), base)


@pytest.mark.slow
def test_interval_1_is_exact(unet_pipe, dit_pipe):
    for pipe in (unet_pipe, dit_pipe):
        assert torch.equal(_cached(pipe, "taylorseer:interval=1,order=2"), _generate(pipe))


@pytest.mark.slow
def test_order_0_is_fora_and_deepcache(unet_pipe, dit_pipe):
    # 7 steps at interval 3: full steps 0, 3 and 6 (the last), for FORA and DeepCache alike
    assert torch.equal(_cached(dit_pipe, "taylorseer:interval=3,order=0,warmup=0"),
                       _cached(dit_pipe, "fora:interval=3"))
    assert torch.equal(_cached(unet_pipe, "taylorseer:interval=3,order=0,warmup=0"),
                       _cached(unet_pipe, "deepcache:interval=3"))
    assert not torch.equal(_cached(dit_pipe, "taylorseer:interval=3,order=1,warmup=0"),
                           _cached(dit_pipe, "fora:interval=3"))


@pytest.mark.slow
def test_a_new_generation_starts_clean(dit_pipe):
    handle = sdinfer.accelerate(dit_pipe, "taylorseer:interval=2,order=2")
    try:
        _generate(dit_pipe, steps=9)
        second = _generate(dit_pipe, steps=6)
    finally:
        handle.remove()
    assert torch.equal(second, _cached(dit_pipe, "taylorseer:interval=2,order=2", steps=6))


def test_taylorseer_in_stock_pipelines():
    from tiny_pipelines import build_tiny_pixart, build_tiny_sd

    sd, pixart = build_tiny_sd(), build_tiny_pixart()
    runs = [(sd, CallCounter(sd.unet.mid_block.resnets[0]), dict(output_type="pt")),
            (pixart, CallCounter(pixart.transformer.transformer_blocks[1].attn1.to_q),
             dict(output_type="latent", use_resolution_binning=False))]
    for pipe, counter, options in runs:
        def run():
            return pipe("a red circle", num_inference_steps=8, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), **options).images

        base = run()
        handle = sdinfer.accelerate(pipe, "taylorseer:interval=3,warmup=2")
        counter.calls = 0
        try:
            out, again = run(), run()
        finally:
            handle.remove()
        assert counter.calls == 2 * 5   # steps 0, 1, 2, 5 and the last (7), guidance batched
        assert torch.equal(out, again) and not torch.equal(out, base)
        assert torch.equal(run(), base)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_taylorseer_on_each_transformer_class(index):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, "taylorseer:interval=2,warmup=2")
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == 4   # steps 0, 1, 2 and 4 (the step count of a bare model is unknown)
    assert all(torch.equal(c, b) for c, b in zip(cached[:3], base[:3]))
    assert not torch.equal(cached[3], base[3])


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("taylorseer:interval=0", "taylorseer interval must be a whole number >= 1, got 0"),
    ("taylorseer:order=3", "taylorseer order must be one of 0, 1, 2, got 3"),
    ("taylorseer:warmup=-1", "taylorseer warmup must be a whole number >= 0, got -1"),
    ("taylorseer:interval=2.5", "taylorseer interval must be a whole number >= 1, got 2.5"),
    ("taylorseer:steps=3", "taylorseer has no option 'steps'"),
])
def test_bad_knobs_are_clear_errors(unet_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(unet_pipe, spec)
