"""Block Caching: each layer block is recomputed when its calibrated change accumulated since its
last refresh reaches the threshold and reused otherwise; threshold 0 is exact; the calibration
is shipped beside the default models, made by `sdinfer calibrate` and a clear error when missing;
default models, stock diffusers pipelines and every transformer class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdinfer
from sdinfer.cache.block_caching import BlockCachingPlan, refresh_plan
from sdinfer.cache.calibration import Calibration, load_for
from sdinfer.errors import UserError
from sdinfer.models.adapters import adapter_for

from cache_helpers import CallCounter, assert_exact, assert_new_generation_starts_clean, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=10):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0).pixels


def _units(model) -> list[str]:
    return [name for name, _ in adapter_for(model).layer_blocks(model)]


def _even_profile(folder, model, steps=6, change=0.1) -> str:
    """A calibration in which every layer block changes by ``change`` on every step."""
    units = _units(model)
    path = folder / f"{type(model).__name__}.safetensors"
    Calibration("blockcache", {"change": torch.full((len(units), steps - 1), change)},
                {"units": units, "steps": steps}).save(path)
    return str(path)


def _planned(model, spec: str, steps: int, index: int) -> int:
    """How many steps of a run the plan computes layer block ``index`` on."""
    config = sdinfer.cache.parse_spec(spec)
    plan = BlockCachingPlan(load_for(model, "blockcache", config.calibration), _units(model), config.threshold)
    return int(refresh_plan(plan.cumulative, plan.threshold, steps)[:, index].sum())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unet", "dit"])
def test_blockcache_skips_layer_blocks_on_the_default_models(unet_pipe, dit_pipe, which):
    pipe = unet_pipe if which == "unet" else dit_pipe
    net = pipe.model.denoiser
    unit, leaf = (("mid_block.attentions.0", net.mid_block.attentions[0].proj_in) if which == "unet"
                  else ("transformer_blocks.1.attn", net.transformer_blocks[1].attn.to_q))
    spec = "blockcache:threshold=0.3"   # the shipped calibration, beside the model
    base = _generate(pipe)
    counter = CallCounter(leaf)
    handle = sdinfer.accelerate(pipe, spec)
    try:
        cached = _generate(pipe)
    finally:
        handle.remove()
    planned = _planned(net, spec, 10, _units(net).index(unit))
    assert counter.calls == planned and 2 <= planned < 10   # 6 (unet) and 7 (dit) of 10
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(pipe), base)     # removed: exactly the uncached model


@pytest.mark.slow
def test_threshold_zero_is_exact_and_a_new_generation_starts_clean(unet_pipe, dit_pipe):
    for pipe in (unet_pipe, dit_pipe):
        assert_exact(_generate, pipe, "blockcache:threshold=0")
    assert_new_generation_starts_clean(_generate, unet_pipe, "blockcache:threshold=0.6")


@pytest.mark.slow
def test_alignment_moves_reused_outputs_towards_the_uncached_ones(unet_pipe):
    from sdinfer.context import StepContext, current_step

    net = unet_pipe.model.denoiser
    unit = "up_blocks.1.attentions.1"
    module = net.get_submodule(unit)
    outputs = {}
    hook = module.register_forward_hook(lambda m, a, out: outputs.setdefault(current_step().step_index, out))
    try:
        _generate(unet_pipe)
    finally:
        hook.remove()
    plan = BlockCachingPlan(load_for(net, "blockcache"), _units(net), 0.1)
    align = plan.aligner(_units(net).index(unit))

    def error(cached, fresh):
        return float((cached[0] - fresh[0]).abs().sum() / fresh[0].abs().sum())

    plain = [error(outputs[s], outputs[s + 1]) for s in range(9)]
    aligned = [error(align(outputs[s], s, StepContext(s + 1, 10, 0.0, 0.0)), outputs[s + 1]) for s in range(9)]
    assert sum(aligned) < 0.85 * sum(plain)   # measured: 0.75 of the unaligned error


def test_the_schedule_accumulates_change_and_reads_other_step_counts_by_progress():
    cumulative = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])   # 0.1 per step over 7 steps
    assert refresh_plan(cumulative, 0.25, 7)[:, 0].tolist() == [True, False, False, True, False, False, True]
    # 13 steps over the same run: 0.05 per step, so a refresh every fifth step
    assert np.flatnonzero(refresh_plan(cumulative, 0.24, 13)[:, 0]).tolist() == [0, 5, 10]
    assert refresh_plan(cumulative, 0.0, 4).all()


def test_the_calibrator_runs_end_to_end_and_drives_a_stock_stable_diffusion_pipeline(tiny_sd, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from test_cli import run

    out = tmp_path / "blockcache.safetensors"
    code, stdout, err = run(capsys, "calibrate", "--method", "blockcache", "--model", str(tiny_sd),
                            "--samples", "2", "--steps", "6", "--out", str(out))
    assert code == 0, err
    assert "wrote blockcache calibration" in stdout
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    units = _units(pipe.unet)
    assert load_for(pipe.unet, "blockcache", str(out)).tensors["change"].shape == (len(units), 5)
    counter = CallCounter(pipe.unet.mid_block.resnets[0].conv1)

    def generate():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    # random weights change a lot per step: a large threshold makes the plan reuse blocks
    for threshold, exact in [(5.0, False), (0.0, True)]:
        spec = f"blockcache:threshold={threshold},calibration={out}"
        counter.calls = 0
        handle = sdinfer.accelerate(pipe, spec)
        try:
            cached = generate()
        finally:
            handle.remove()
        assert counter.calls == _planned(pipe.unet, spec, 6, units.index("mid_block.resnets.0")), spec
        assert torch.equal(cached, base) == exact, spec
    assert torch.equal(generate(), base)


def test_blockcache_in_a_stock_pixart_pipeline(tmp_path):
    from tiny_pipelines import build_tiny_pixart

    pipe = build_tiny_pixart()
    counter = CallCounter(pipe.transformer.transformer_blocks[1].ff.net[0])

    def generate():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    base = generate()
    counter.calls = 0
    # 0.1 per step: the accumulated change reaches 0.25 on steps 3 and 6, so steps 0 and 3 compute
    handle = sdinfer.accelerate(pipe, f"blockcache:threshold=0.25,align=false,"
                                      f"calibration={_even_profile(tmp_path, pipe.transformer)}")
    try:
        cached = generate()
    finally:
        handle.remove()
    assert counter.calls == 2
    assert not torch.equal(cached, base)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_blockcache_on_each_transformer_class(tmp_path, index):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        # a bare model's step count is unknown: the calibrated 6 steps are assumed
        handle = sdinfer.accelerate(model, f"blockcache:threshold=0.25,align=false,"
                                           f"calibration={_even_profile(tmp_path, model)}")
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == 2   # steps 0 and 3
    assert torch.equal(cached[0], base[0]) and not torch.equal(cached[1], base[1])


@pytest.mark.slow
def test_missing_or_foreign_calibration_is_a_clear_error(dit_pipe, tmp_path):
    sd3 = tiny_transformers()[0][0]
    with pytest.raises(UserError, match="blockcache needs calibration data.*not loaded from a folder.*"
                                        "sdinfer calibrate --method blockcache"):
        sdinfer.accelerate(sd3, "blockcache")
    with pytest.raises(UserError, match="blockcache needs calibration data, and there is none at"):
        sdinfer.accelerate(dit_pipe, f"blockcache:calibration={tmp_path / 'none.safetensors'}")
    with pytest.raises(UserError, match="made for a model with other layer blocks than this SD3Transformer2DModel"):
        sdinfer.accelerate(dit_pipe, f"blockcache:calibration={_even_profile(tmp_path, sd3)}")
    net = dit_pipe.model.denoiser
    assert not hasattr(net, "_diffusers_hook") or not net._diffusers_hook.hooks   # nothing left installed


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("blockcache:threshold=-0.1", "blockcache threshold must be a number >= 0, got -0.1"),
    ("blockcache:threshold=nan", "blockcache threshold must be a number >= 0, got nan"),
    ("blockcache:threshold=high", "blockcache option threshold='high' is not a float"),
    ("blockcache:align=maybe", "blockcache option align='maybe' is not a bool"),
    ("blockcache:interval=2", "blockcache has no option 'interval'"),
])
def test_bad_knobs_are_clear_errors(unet_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(unet_pipe, spec)


def test_a_model_without_layer_blocks_names_the_supported_classes():
    from sdinfer.models.adapters import ADAPTERS, BlockGroup, ModelAdapter, register_adapter

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    register_adapter("Plain", ModelAdapter("dit", (BlockGroup("blocks"),)))
    try:
        with pytest.raises(UserError, match="blockcache supports models whose adapter declares layer blocks "
                                            r"\(.*UNet2DConditionModel.*\); Plain declares none"):
            sdinfer.accelerate(Plain(), "blockcache")
    finally:
        ADAPTERS.pop("Plain")
