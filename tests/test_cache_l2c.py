"""Learning-to-Cache: on the odd steps the layers a learned router ranks lowest reuse their output of
the step before, cut to a budget; budget 1 is exact; routers are specific to the step count; the
router is shipped beside the default models, learned by `sdinfer calibrate` and a clear error when
missing; default models, stock diffusers pipelines and every transformer class."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache import learning_to_cache
from sdinfer.cache.calibration import Calibration, load_for
from sdinfer.cache.learning_to_cache import computed_layers
from sdinfer.errors import UserError
from sdinfer.models.adapters import adapter_for

from cache_helpers import CallCounter, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=50):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _units(model) -> list[str]:
    return [name for name, _ in adapter_for(model).layer_blocks(model)]


def _router(folder, model, steps=6) -> str:
    """A router whose need rises with the layer: on a cache step the last layers compute first."""
    units = _units(model)
    logits = torch.linspace(-4.0, 4.0, len(units)).expand(1, steps, len(units))
    path = folder / f"{type(model).__name__}.safetensors"
    Calibration("l2c", {"logits": logits}, {"units": units, "steps": steps}).save(path)
    return str(path)


def _planned(model, budget: float, index: int, given: str = "") -> int:
    """How many steps of the calibrated count compute layer ``index`` at ``budget``."""
    logits = load_for(model, "l2c", given).tensors["logits"]
    return int(computed_layers(logits, budget)[:, index].sum())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unet", "dit"])
def test_l2c_skips_layers_on_the_default_models(unet_pipe, dit_pipe, which):
    pipe = unet_pipe if which == "unet" else dit_pipe
    net = pipe.model.denoiser
    unit, leaf = (("mid_block.attentions.0", net.mid_block.attentions[0].proj_in) if which == "unet"
                  else ("transformer_blocks.1.ff", net.transformer_blocks[1].ff.net[0]))
    base = _generate(pipe)
    counter = CallCounter(leaf)
    handle = sdinfer.accelerate(pipe, "l2c")   # budget 0.35 and the shipped router: 50 DDIM steps
    try:
        cached = _generate(pipe)
    finally:
        handle.remove()
    planned = _planned(net, 0.35, _units(net).index(unit))
    assert counter.calls == planned and 25 <= planned < 50   # the even steps and more: 25 (unet), 34 (dit)
    assert not torch.equal(cached, base)


@pytest.mark.slow
def test_budget_one_is_exact_removal_restores_and_a_new_generation_starts_clean(unet_pipe, dit_pipe, tmp_path):
    for pipe in (unet_pipe, dit_pipe):
        router = _router(tmp_path, pipe.model.denoiser, steps=5)
        base = _generate(pipe, steps=5)
        for budget, exact in [(1.0, True), (0.5, False)]:
            handle = sdinfer.accelerate(pipe, f"l2c:budget={budget},calibration={router}")
            try:
                assert torch.equal(_generate(pipe, steps=5), base) == exact
            finally:
                handle.remove()
        assert torch.equal(_generate(pipe, steps=5), base)   # removed: exactly the uncached model
    spec = f"l2c:budget=0.5,calibration={_router(tmp_path, dit_pipe.model.denoiser, steps=5)}"
    handle = sdinfer.accelerate(dit_pipe, spec)
    try:
        _generate(dit_pipe, steps=5)
        second = _generate(dit_pipe, steps=5)
        handle.remove()
        handle = sdinfer.accelerate(dit_pipe, spec)
        fresh = _generate(dit_pipe, steps=5)
    finally:
        handle.remove()
    assert torch.equal(second, fresh)


@pytest.mark.slow
def test_a_run_with_another_step_count_is_a_clear_error(dit_pipe):
    handle = sdinfer.accelerate(dit_pipe, "l2c")
    try:
        with pytest.raises(UserError, match="l2c router was learned for 50 steps and this run has 20.*"
                                            "sdinfer calibrate --method l2c --steps N"):
            _generate(dit_pipe, steps=20)
    finally:
        handle.remove()


def test_the_budget_keeps_the_layer_steps_of_highest_need():
    logits = torch.tensor([[[5.0, 5.0], [1.0, -1.0], [5.0, 5.0], [-2.0, 3.0]]])   # 1 lambda, 4 steps
    plan = computed_layers(logits, 0.5)
    assert plan.tolist() == [[True, True], [True, False], [True, True], [False, True]]
    assert computed_layers(logits, 0.0)[1::2].sum() == 0 and computed_layers(logits, 1.0).all()


def test_the_calibrator_learns_a_router_and_drives_a_stock_stable_diffusion_pipeline(
        tiny_sd, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from test_cli import run

    monkeypatch.setattr(learning_to_cache, "ITERATIONS", 1)
    out = tmp_path / "l2c.safetensors"
    code, stdout, err = run(capsys, "calibrate", "--method", "l2c", "--model", str(tiny_sd),
                            "--samples", "2", "--steps", "6", "--out", str(out))
    assert code == 0, err
    assert "wrote l2c calibration" in stdout
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    units = _units(pipe.unet)
    logits = load_for(pipe.unet, "l2c", str(out)).tensors["logits"]
    assert logits.shape == (len(learning_to_cache.L1_WEIGHTS), 6, len(units))
    counter = CallCounter(pipe.unet.mid_block.resnets[0].conv1)

    def generate():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    for budget, exact in [(0.0, False), (1.0, True)]:
        counter.calls = 0
        handle = sdinfer.accelerate(pipe, f"l2c:budget={budget},calibration={out}")
        try:
            cached = generate()
        finally:
            handle.remove()
        assert counter.calls == (3 if budget == 0 else 6)   # budget 0: the even steps only
        assert torch.equal(cached, base) == exact
    assert torch.equal(generate(), base)


def test_l2c_in_a_stock_pixart_pipeline(tmp_path):
    from tiny_pipelines import build_tiny_pixart

    pipe = build_tiny_pixart()
    first, last = (CallCounter(pipe.transformer.transformer_blocks[0].attn1.to_q),
                   CallCounter(pipe.transformer.transformer_blocks[1].ff.net[0]))

    def generate():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    base = generate()
    first.calls = last.calls = 0
    handle = sdinfer.accelerate(pipe, f"l2c:budget=0.5,calibration={_router(tmp_path, pipe.transformer)}")
    try:
        cached = generate()
    finally:
        handle.remove()
    assert (first.calls, last.calls) == (3, 6)   # the router ranks the last layers higher
    assert not torch.equal(cached, base)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_l2c_on_each_transformer_class(tmp_path, index):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        # a bare model's step count is unknown: the router's 6 steps are assumed
        handle = sdinfer.accelerate(model, f"l2c:budget=0,calibration={_router(tmp_path, model)}")
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == 3   # the even steps
    assert torch.equal(cached[0], base[0]) and not torch.equal(cached[1], base[1])


@pytest.mark.slow
def test_missing_or_foreign_calibration_is_a_clear_error(dit_pipe, tmp_path):
    sd3 = tiny_transformers()[0][0]
    with pytest.raises(UserError, match="l2c needs calibration data.*not loaded from a folder.*"
                                        "sdinfer calibrate --method l2c"):
        sdinfer.accelerate(sd3, "l2c")
    with pytest.raises(UserError, match="l2c needs calibration data, and there is none at"):
        sdinfer.accelerate(dit_pipe, f"l2c:calibration={tmp_path / 'none.safetensors'}")
    with pytest.raises(UserError, match="made for a model with other layer blocks than this SD3Transformer2DModel"):
        sdinfer.accelerate(dit_pipe, f"l2c:calibration={_router(tmp_path, sd3)}")
    net = dit_pipe.model.denoiser
    assert not hasattr(net, "_diffusers_hook") or not net._diffusers_hook.hooks   # nothing left installed


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("l2c:budget=1.5", r"l2c budget must be the fraction of the cache steps' layers computed, in \[0, 1\], got 1.5"),
    ("l2c:budget=-0.1", r"l2c budget must be .* got -0.1"),
    ("l2c:budget=half", "l2c option budget='half' is not a float"),
    ("l2c:threshold=0.1", "l2c has no option 'threshold'"),
])
def test_bad_knobs_are_clear_errors(unet_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(unet_pipe, spec)
