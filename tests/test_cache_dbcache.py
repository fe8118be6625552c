"""DBCache: the middle blocks really are skipped while the front and back blocks run, threshold 0
is exact, fn=1 / bn=0 is First-Block Cache, the step limits and the TaylorSeer calibrator act,
state is per generation, removal restores the model; on the default DiT and on stock diffusers
pipelines and tiny models of every transformer class."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.errors import UserError
from sdinfer.eval.metrics import psnr

from cache_helpers import CallCounter, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=6):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _cached(pipe, spec, steps=6):
    handle = sdinfer.accelerate(pipe, spec)
    try:
        return _generate(pipe, steps)
    finally:
        handle.remove()


@pytest.mark.slow
def test_dbcache_skips_the_middle_blocks_on_the_default_dit(dit_pipe):
    blocks = dit_pipe.model.denoiser.transformer_blocks   # 4 blocks: front 0, middle 1-2, back 3
    front, middle, back = (CallCounter(blocks[i].attn.to_q) for i in (0, 2, 3))
    base = _generate(dit_pipe, steps=20)
    front.calls = middle.calls = back.calls = 0
    cached = _cached(dit_pipe, "dbcache:fn=1,bn=1,threshold=0.12", steps=20)
    assert front.calls == back.calls == 20
    assert middle.calls < 16   # measured: 12 of 20 steps computed
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(dit_pipe, steps=20), base)   # removed: exactly the uncached model


@pytest.mark.slow
def test_threshold_0_is_exact(dit_pipe):
    base = _generate(dit_pipe)
    for spec in ("dbcache:threshold=0", "dbcache:fn=2,bn=1,threshold=0,taylorseer=true,order=2"):
        assert torch.equal(_cached(dit_pipe, spec), base), spec


@pytest.mark.slow
def test_fn_1_bn_0_is_first_block_cache(dit_pipe):
    for threshold in (0.08, 0.2):
        assert torch.equal(_cached(dit_pipe, f"dbcache:fn=1,bn=0,threshold={threshold},taylorseer=false", steps=20),
                           _cached(dit_pipe, f"fbcache:threshold={threshold}", steps=20))


@pytest.mark.slow
def test_the_taylorseer_calibrator_forecasts_the_middle_residual(dit_pipe):
    base = _generate(dit_pipe, steps=20)
    frozen = _cached(dit_pipe, "dbcache:fn=1,bn=0,threshold=0.16,taylorseer=false", steps=20)
    forecast = _cached(dit_pipe, "dbcache:fn=1,bn=0,threshold=0.16,taylorseer=true", steps=20)
    assert psnr(forecast, base) > psnr(frozen, base) + 2.0   # measured 52.4 dB vs 48.5 dB (10 of 20 computed)


@pytest.mark.slow
def test_a_new_generation_starts_clean(dit_pipe):
    spec = "dbcache:threshold=0.2,taylorseer=true"
    handle = sdinfer.accelerate(dit_pipe, spec)
    try:
        _generate(dit_pipe, steps=9)
        second = _generate(dit_pipe, steps=7)
    finally:
        handle.remove()
    assert torch.equal(second, _cached(dit_pipe, spec, steps=7))


def test_dbcache_in_a_stock_pixart_pipeline():
    from tiny_pipelines import build_tiny_pixart

    pipe = build_tiny_pixart()   # 2 blocks: front 0, middle 1
    middle = CallCounter(pipe.transformer.transformer_blocks[1].attn1.to_q)

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    base = run()
    for spec, computed in [("dbcache:fn=1,bn=0,threshold=100", 1), ("dbcache:fn=1,bn=0,threshold=0", 6)]:
        handle = sdinfer.accelerate(pipe, spec)
        middle.calls = 0
        try:
            out, again = run(), run()
        finally:
            handle.remove()
        assert middle.calls == 2 * computed, spec   # guidance batched: one call per step
        assert torch.equal(out, again)
        assert torch.equal(out, base) == (computed == 6), spec
    assert torch.equal(run(), base)


@pytest.mark.parametrize("spec, computed", [
    ("dbcache:fn=1,bn=0,threshold=100", {0}),
    ("dbcache:fn=1,bn=0,threshold=100,warmup=2", {0, 1}),
    ("dbcache:fn=1,bn=0,threshold=100,max_continuous_cached_steps=2", {0, 3}),
    ("dbcache:fn=1,bn=0,threshold=100,max_cached_steps=2", {0, 3, 4, 5}),
    ("dbcache:fn=1,bn=0,threshold=100,taylorseer=false,max_continuous_cached_steps=1", {0, 2, 4}),
    ("dbcache:fn=1,bn=0,threshold=0", {0, 1, 2, 3, 4, 5}),
])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_dbcache_on_each_transformer_class(index, spec, computed):
    model, call, leaf = tiny_transformers()[index]   # 2 blocks each; the leaf is in the second
    counter = CallCounter(leaf)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, spec)
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == len(computed)
    # the same input at every call: a computed step is the uncached output, a skipped one is not
    assert [torch.equal(c, b) for c, b in zip(cached, base)] == [i in computed for i in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("dbcache:fn=0", "dbcache fn must be a whole number >= 1, got 0"),
    ("dbcache:bn=-1", "dbcache bn must be a whole number >= 0, got -1"),
    ("dbcache:threshold=-0.1", "dbcache threshold must be >= 0, got -0.1"),
    ("dbcache:warmup=1.5", "dbcache warmup must be a whole number >= 0, got 1.5"),
    ("dbcache:max_cached_steps=-1", r"dbcache max_cached_steps must be a whole number >= 0 \(0: no cap\), got -1"),
    ("dbcache:max_continuous_cached_steps=-1", "dbcache max_continuous_cached_steps must be a whole number >= 0"),
    ("dbcache:order=3", r"dbcache order must be one of 1, 2 \(the TaylorSeer calibrator's\), got 3"),
    ("dbcache:taylorseer=yes", "dbcache option taylorseer='yes' is not a bool"),
    ("dbcache:fn=2,bn=2", "computes the first 2 and the last 2 of the 4 blocks of SD3Transformer2DModel, "
                          r"which leaves no middle block to cache \(fn \+ bn must be at most 3\)"),
])
def test_bad_knobs_are_clear_errors(dit_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(dit_pipe, spec)
    denoiser = dit_pipe.model.denoiser
    assert not hasattr(denoiser, "_diffusers_hook") or not denoiser._diffusers_hook.hooks   # nothing installed


@pytest.mark.slow
def test_a_unet_is_refused_naming_the_supported_classes(unet_pipe):
    with pytest.raises(UserError, match="dbcache supports transformers .*DiTTransformer2DModel.*"
                                        "FluxTransformer2DModel.*PixArtTransformer2DModel.*SD3Transformer2DModel.*"
                                        "UNet2DConditionModel is a UNet.*use deepcache"):
        sdinfer.accelerate(unet_pipe, "dbcache")
