"""T-GATE: cross-attention (or an MM-DiT's text stream) runs only until the gate and is kept
after it, self-attention on v2's intervals, the guidance branches merge after the gate; exact
with the gate past the last step; on the default models, on stock diffusers pipelines and on
each text-conditioned transformer class."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache.tgate import TGateConfig
from sdinfer.context import StepContext, step_context
from sdinfer.errors import UserError
from sdinfer.models.calling import call_denoiser

from cache_helpers import CallCounter, tiny_transformers

PROMPT = "a red circle in the top left"
V2 = "tgate:gate_step=3,sp_interval=2,warm_up=0,fi_interval=2"
# steps 0-1 plan, 2 is the gate, 3-5 follow; self-attention runs on steps 0 (warm-up), 2 (gate), 4
CROSS_CALLS, SELF_CALLS, BATCHES = 3, 3, [2, 2, 2, 1, 1, 1]


class BatchSizes:
    """The batch size of every call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.sizes: list[int] = []
        module.register_forward_hook(lambda m, args, out: self.sizes.append(args[0].shape[0]))


def _generate(pipe, steps=6, cfg=4.0):
    return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=cfg).pixels


def _cached(pipe, spec, **kwargs):
    handle = sdinfer.accelerate(pipe, spec)
    try:
        return _generate(pipe, **kwargs)
    finally:
        handle.remove()


def test_the_schedule_is_the_reference_ones():
    """HaozheLiu-ST/T-GATE's tgate_scheduler at gate_step 10, sp_interval 5, fi_interval 2,
    warm_up 2 over 25 steps: which steps compute each attention and where the gate keeps."""
    config = TGateConfig(gate_step=10, sp_interval=5, fi_interval=2, warm_up=2)
    steps = [StepContext(s, 25, t=0.5, model_t=500.0) for s in range(25)]
    assert [c.step_index for c in steps if config.computes_self(c)] == [0, 1, 2, 5, 9] + list(range(10, 25, 2))
    assert [c.step_index for c in steps if config.computes_cross(c)] == list(range(10))
    assert [c.step_index for c in steps if config.keeps_cross(c)] == [9]
    assert TGateConfig(gate=0.4).planning_steps(steps[0]) == 10   # the paper's 10 of 25


@pytest.mark.slow
def test_tgate_gates_cross_attention_and_merges_branches_on_the_default_unet(unet_pipe):
    block = unet_pipe.model.denoiser.down_blocks[2].attentions[0].transformer_blocks[0]
    cross, self_attn, batches = CallCounter(block.attn2.to_q), CallCounter(block.attn1.to_q), BatchSizes(block.ff)
    base = _generate(unet_pipe)
    cross.calls = self_attn.calls = 0
    batches.sizes.clear()
    cached = _cached(unet_pipe, V2)
    assert (cross.calls, self_attn.calls, batches.sizes) == (CROSS_CALLS, SELF_CALLS, BATCHES)
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(unet_pipe), base)   # removed: exactly the uncached model


@pytest.mark.slow
def test_tgate_freezes_the_text_stream_and_merges_branches_on_the_default_dit(dit_pipe):
    block = dit_pipe.model.denoiser.transformer_blocks[1]
    text_mlp, joint, batches = CallCounter(block.ff_context.net[0]), CallCounter(block.attn.to_q), BatchSizes(block.ff)
    base = _generate(dit_pipe)
    text_mlp.calls = joint.calls = 0
    batches.sizes.clear()
    cached = _cached(dit_pipe, V2)
    assert (text_mlp.calls, joint.calls, batches.sizes) == (CROSS_CALLS, SELF_CALLS, BATCHES)
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(dit_pipe), base)


@pytest.mark.slow
def test_tgate_with_the_gate_past_the_last_step_is_exact(unet_pipe, dit_pipe):
    for pipe in (unet_pipe, dit_pipe):
        base = _generate(pipe)
        for spec in ["tgate:gate=1,sp_interval=1", "tgate:gate_step=6,sp_interval=1,fi_interval=3",
                     "tgate:gate_step=50,sp_interval=1,merge=false"]:
            assert torch.equal(_cached(pipe, spec), base), spec


@pytest.mark.slow
def test_without_merging_each_branch_keeps_its_own_cross_attention(unet_pipe):
    block = unet_pipe.model.denoiser.down_blocks[2].attentions[0].transformer_blocks[0]
    cross, batches = CallCounter(block.attn2.to_q), BatchSizes(block.ff)
    merged = _cached(unet_pipe, "tgate:gate_step=3")
    cross.calls = 0
    batches.sizes.clear()
    unmerged = _cached(unet_pipe, "tgate:gate_step=3,merge=false")
    assert (cross.calls, batches.sizes) == (3, [2] * 6)
    assert not torch.equal(merged, unmerged)


@pytest.mark.slow
def test_the_merged_pass_takes_the_conditional_half_the_context_names(unet_pipe):
    """The default UNet also feeds the text to its time embedding, so the half matters."""
    net = unet_pipe.model.denoiser
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=gen).repeat(2, 1, 1, 1)
    cond, uncond = torch.randn(2, 1, 16, 64, generator=gen)
    handle = sdinfer.accelerate(net, "tgate:gate_step=2")
    generations = iter(range(1000, 1010))

    def fidelity_output(text, halves):
        generation = next(generations)
        with torch.no_grad():
            for step in range(3):   # plan, gate, then the first merged step
                ctx = StepContext(step, 3, t=0.5, model_t=500.0, generation=generation, guidance_halves=halves)
                with step_context(ctx):
                    out = call_denoiser(net, x, torch.full((2,), 500.0), text)
        return out

    try:
        cond_first = fidelity_output(torch.cat([cond, uncond]), ("cond", "uncond"))
        uncond_first = fidelity_output(torch.cat([uncond, cond]), ("uncond", "cond"))
        misnamed = fidelity_output(torch.cat([uncond, cond]), ("cond", "uncond"))
    finally:
        handle.remove()
    assert torch.equal(cond_first[0], cond_first[1])
    torch.testing.assert_close(cond_first, uncond_first)
    assert not torch.allclose(misnamed, cond_first, atol=1e-4)


def test_tgate_in_a_stock_stable_diffusion_pipeline():
    from tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd()
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    cross, batches = CallCounter(block.attn2.to_q), BatchSizes(block.ff)

    def run(cfg=4.0):
        return pipe("a red circle", num_inference_steps=6, guidance_scale=cfg, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base, base_unguided = run(), run(cfg=1.0)
    handle = sdinfer.accelerate(pipe, "tgate:gate_step=3")
    cross.calls = 0
    batches.sizes.clear()
    try:
        out, again = run(), run()   # a second generation: the tracker restarts
        assert (cross.calls, batches.sizes) == (6, BATCHES * 2)   # diffusers batches [uncond, cond]
        cross.calls = 0
        batches.sizes.clear()
        unguided = run(cfg=1.0)   # nothing to merge: one branch all along
        assert (cross.calls, batches.sizes) == (3, [1] * 6)
    finally:
        handle.remove()
    assert torch.equal(out, again)
    assert not torch.equal(out, base) and not torch.equal(unguided, base_unguided)
    handle = sdinfer.accelerate(pipe, "tgate:gate=1,sp_interval=1")
    try:
        assert torch.equal(run(), base)
    finally:
        handle.remove()
    assert torch.equal(run(), base)


def test_tgate_in_a_stock_pixart_pipeline_gates_without_merging():
    """PixArt's pipelines do not say that they batch guidance: both halves keep running."""
    from tiny_pipelines import build_tiny_pixart

    pipe = build_tiny_pixart()
    block = pipe.transformer.transformer_blocks[1]
    cross, batches = CallCounter(block.attn2.to_q), BatchSizes(block.ff)

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    base = run()
    cross.calls = 0
    batches.sizes.clear()
    handle = sdinfer.accelerate(pipe, "tgate:gate_step=3")
    try:
        out = run()
        assert (cross.calls, batches.sizes) == (3, [2] * 6)
        handle.remove()
        handle = sdinfer.accelerate(pipe, "tgate:gate=1,sp_interval=1")
        assert torch.equal(run(), base)
    finally:
        handle.remove()
    assert not torch.equal(out, base)


@pytest.mark.parametrize("index", [0, 1], ids=["SD3Transformer2DModel", "FluxTransformer2DModel"])
def test_tgate_freezes_the_text_stream_of_each_mmdit_class(index):
    model, call, _ = tiny_transformers()[index]
    text_mlp = CallCounter(model.transformer_blocks[0].ff_context.net[0])
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, "tgate:gate_step=2")
        text_mlp.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert text_mlp.calls == 2
    assert torch.equal(cached[1], base[1]) and not torch.equal(cached[2], base[2])


def test_tgate_rejects_a_class_conditioned_dit_and_needs_a_step_count_for_a_fraction():
    sd3, call_sd3, _ = tiny_transformers()[0]
    dit = tiny_transformers()[2][0]
    with pytest.raises(UserError, match="SD3Transformer2DModel.*UNet2DConditionModel.*DiTTransformer2DModel has neither"):
        sdinfer.accelerate(dit, "tgate")
    handle = sdinfer.accelerate(sd3, "tgate:gate=0.4")
    try:
        with pytest.raises(ValueError, match="gate_step"), torch.no_grad():
            call_sd3(torch.tensor([900.0]))
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tgate:gate=0.4,sp_interval=2", "tgate:gate=0.5,fi_interval=2,merge=false"])
def test_a_new_generation_starts_clean(unet_pipe, dit_pipe, spec):
    for pipe in (unet_pipe, dit_pipe):
        handle = sdinfer.accelerate(pipe, spec)
        try:
            _generate(pipe, steps=7)
            second = _generate(pipe, steps=5)
            handle.remove()
            handle = sdinfer.accelerate(pipe, spec)
            fresh = _generate(pipe, steps=5)
        finally:
            handle.remove()
        assert torch.equal(second, fresh)


def test_tgate_composes_with_deepcache_across_the_merge_and_comes_off_in_any_order():
    """After the merge DeepCache sees a batch of half the size: it keeps a separate state for it."""
    from tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd()
    deep = BatchSizes(pipe.unet.mid_block.resnets[0])

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = run()
    deep.sizes.clear()
    both = sdinfer.accelerate(pipe, "deepcache:interval=2+tgate:gate_step=3")
    try:
        run()
        # DeepCache computes steps 0 and 2, then the merged branch afresh at step 3, and at 4
        assert deep.sizes == [2, 2, 1, 1]
        both.handles[1].remove()   # T-GATE off first: the step tracker above its hook keeps working
        deep.sizes.clear()
        run()
        assert deep.sizes == [2, 2, 2]
    finally:
        both.remove()
    assert torch.equal(run(), base)


@pytest.mark.slow
@pytest.mark.parametrize("spec, knob", [("gate=0", "gate"), ("gate=1.5", "gate"), ("gate_step=-1", "gate_step"),
                                        ("gate_step=2.5", "gate_step"), ("sp_interval=0", "sp_interval"),
                                        ("fi_interval=0", "fi_interval"), ("warm_up=-1", "warm_up"),
                                        ("merge=maybe", "merge")])
def test_bad_knobs_are_clear_errors(unet_pipe, spec, knob):
    with pytest.raises(UserError, match=knob):
        sdinfer.accelerate(unet_pipe, f"tgate:{spec}")
