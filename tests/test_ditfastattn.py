"""DiTFastAttn: window attention plus the kept residual is full attention; output sharing returns
the kept output; CFG sharing computes the conditional half only; the greedy plan keeps full
attention at threshold 0 (exact) and compresses at a large one; the attention FLOPs of a plan;
plans save, load and are checked against the model and step count; bad input is one UserError."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache import ditfastattn as dfa
from sdinfer.context import StepContext
from sdinfer.errors import UserError

from cache_helpers import CallCounter, tiny_transformers

PROMPTS = ["a red circle in the top left", "a blue square in the bottom right",
           "a green triangle in the center", "a yellow circle in the top right"]


def _sd3_attention():
    """A tiny SD3 transformer's first joint attention and inputs of batch 2 (image, text tokens)."""
    model = tiny_transformers()[0][0]
    attention = model.transformer_blocks[0].attn
    torch.manual_seed(1)
    kwargs = {"hidden_states": torch.randn(2, 16, 16), "encoder_hidden_states": torch.randn(2, 3, 16)}
    return model, attention, kwargs


def _ctx(step: int = 0, halves=None, steps: int = 4) -> StepContext:
    return StepContext(step_index=step, num_steps=steps, t=0.5, model_t=500.0, branch="both",
                       guidance_halves=halves)


def _close(a, b, tol=1e-5) -> bool:
    return all(torch.allclose(x, y, atol=tol, rtol=0) for x, y in zip(dfa.tensors_of(a), dfa.tensors_of(b)))


@pytest.mark.parametrize("tokens, window_size, local", [(272, 128, 256), (272, 128, 272), (40, 6, 32), (9, 50, 9)])
def test_window_pairs_counts_the_mask_without_building_it(tokens, window_size, local):
    assert dfa.window_pairs(tokens, window_size, local) == \
        int(dfa.window_mask(tokens, window_size, local, text_first=False).sum())


def test_window_mask_keeps_the_band_and_the_text_tokens_global():
    mask = dfa.window_mask(6, 2, 4, text_first=False)   # 4 image tokens, then 2 text tokens
    assert mask[0, :4].tolist() == [True, True, False, False]
    assert mask[2, :4].tolist() == [False, True, True, True]
    assert mask[:, 4:].all() and mask[4:, :].all()
    first = dfa.window_mask(6, 2, 4, text_first=True)   # FLUX: the text first
    assert first[:2, :].all() and first[:, :2].all() and not first[2, 5]
    assert int(dfa.window_mask(5, 100, 5, False).sum()) == 25


@pytest.mark.parametrize("text_first", [False, True])
def test_banded_attention_equals_the_masked_call(text_first):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 45, 8) for _ in range(3))   # 40 image tokens and 5 text tokens
    for window_size in (6, 9):
        blocks = dfa.band_blocks(45, 40, window_size // 2, text_first)
        assert len(blocks) >= 3
        banded = dfa.banded_attention(q, k, v, None, 40, blocks, text_first)
        mask = dfa.window_mask(45, window_size, 40, text_first)
        masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(banded, masked, atol=1e-6, rtol=0)
        reach = sum((r.stop - r.start) * (qs.stop - qs.start) for qs, r, _ in blocks)
        assert reach < 40 * 40   # fewer image pairs than full attention computes


def test_window_attention_with_residual_is_full_attention():
    _, attention, kwargs = _sd3_attention()
    forward, ctx, state = attention.forward, _ctx(), dfa.LayerState()
    with torch.no_grad():
        full = forward(**kwargs)
        for window_size, covers in [(64, True), (2, False)]:
            window = dfa.Window(window_size, False, "attn")
            narrow = window(forward, (), kwargs)
            assert _close(narrow, full) == covers   # a narrow window alone is not full attention
            out, state.residual = dfa.run_method(dfa.FULL, forward, (), kwargs, ctx, state, window, True)
            assert all(torch.equal(a, b) for a, b in zip(dfa.tensors_of(out), dfa.tensors_of(full)))
            residual_norm = sum(float(t.abs().max()) for t in dfa.tensors_of(state.residual))
            assert (residual_norm < 1e-5) == covers
            shared, _ = dfa.run_method(dfa.WINDOW, forward, (), kwargs, ctx, state, window, False)
            assert _close(shared, full)
    assert window.geometry == (19, 16, int(dfa.window_mask(19, 2, 16, False).sum()))


def test_output_sharing_returns_the_kept_output_without_computing():
    _, attention, kwargs = _sd3_attention()
    counter = CallCounter(attention.to_q)
    kept = (torch.randn(2, 16, 16), torch.randn(2, 3, 16))
    out, residual = dfa.run_method(dfa.SHARE, attention.forward, (), kwargs, _ctx(1), dfa.LayerState(output=kept),
                                   dfa.Window(2, False, "attn"), False)
    assert out is kept and residual is None and counter.calls == 0


@pytest.mark.parametrize("halves", [("cond", "uncond"), ("uncond", "cond")])
def test_cfg_sharing_computes_the_conditional_half_once_for_both(halves):
    _, attention, kwargs = _sd3_attention()
    rows = []
    attention.to_q.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    cond = halves.index("cond")
    with torch.no_grad():
        alone = attention(**{k: v[cond:cond + 1] for k, v in kwargs.items()})
        rows.clear()
        out, _ = dfa.run_method(dfa.FULL_CFG, attention.forward, (), kwargs, _ctx(0, halves), dfa.LayerState(),
                                dfa.Window(2, False, "attn"), False)
    assert rows == [1]   # one computation, on one image: the unconditional half is not computed
    for t, a in zip(dfa.tensors_of(out), dfa.tensors_of(alone)):
        assert t.shape[0] == 2 and torch.equal(t[0], t[1]) and torch.allclose(t[:1], a, atol=1e-6)
    with torch.no_grad():   # not a batched guidance call: the whole batch runs
        rows.clear()
        dfa.run_method(dfa.FULL_CFG, attention.forward, (), kwargs, _ctx(0, None), dfa.LayerState(),
                       dfa.Window(2, False, "attn"), False)
    assert rows == [2]


def _plan(model, methods: list[list[int]], window_size: int = 2) -> dfa.FastAttnPlan:
    units = [name for name, _ in dfa.self_attentions(model)]
    rows = torch.tensor(methods, dtype=torch.int8).expand(-1, len(units)) if len(methods[0]) == 1 else \
        torch.tensor(methods, dtype=torch.int8)
    return dfa.FastAttnPlan(rows.clone(), units, window_size, 0.05, [19] * len(units), [16] * len(units),
                            [40] * len(units), denoiser=type(model).__name__)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_a_plan_runs_on_each_transformer_class(tmp_path, index):
    model, call, _ = tiny_transformers()[index]
    name, attention = dfa.self_attentions(model)[-1]
    counter = CallCounter(attention.to_q)
    path = tmp_path / "plan.safetensors"
    dfa.save_plans(path, [_plan(model, [[dfa.FULL], [dfa.WINDOW], [dfa.SHARE], [dfa.FULL]])])
    timesteps = torch.tensor([900.0, 600.0, 300.0, 100.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, f"ditfastattn:threshold=0.05,window_size=2,calibration={path}")
        counter.calls = 0
        try:
            fast = [call(t) for t in timesteps]
        finally:
            handle.remove()
        # step 0: full attention and the window for its residual; 1: the window; 2: shared; 3: full
        assert counter.calls == 4
        assert torch.equal(call(timesteps[1]), base[1])   # removed: the model is as it was
    assert torch.equal(fast[0], base[0]) and not torch.equal(fast[2], base[2])


def test_a_cfg_shared_plan_runs_the_conditional_half_in_the_pipeline(dit_pipe, tmp_path):
    net = dit_pipe.model.denoiser
    path = tmp_path / "cfg.safetensors"
    dfa.save_plans(path, [_plan(net, [[dfa.FULL_CFG]] * 3, window_size=64)])
    rows = []
    hook = net.transformer_blocks[0].attn.to_q.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        base = _generate(dit_pipe, steps=3)
        assert set(rows) == {2}   # one prompt, both guidance branches
        rows.clear()
        handle = sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0.05,window_size=64,calibration={path}")
        try:
            shared = _generate(dit_pipe, steps=3)
        finally:
            handle.remove()
    finally:
        hook.remove()
    assert set(rows) == {1} and not torch.equal(shared, base)


def test_attention_flops_count_windows_shares_and_cfg_halves():
    model = tiny_transformers()[2][0]   # DiT: 2 self-attention layers
    plan = _plan(model, [[dfa.FULL, dfa.FULL], [dfa.WINDOW, dfa.FULL], [dfa.SHARE, dfa.FULL_CFG],
                         [dfa.FULL_CFG, dfa.WINDOW_CFG]])
    plan.tokens, plan.width, plan.pairs = [4, 4], [1, 1], [10, 10]
    assert plan.need_residual().tolist() == [[True, False], [False, False], [False, True], [False, False]]
    flops = dfa.attention_flops(plan)
    dense, window = 4 * 16, 4 * 10
    layer0 = 2 * (dense + window) + 2 * window + 0 + 1 * dense
    layer1 = 2 * dense + 2 * dense + 1 * (dense + window) + 1 * window
    assert flops["plan"] == layer0 + layer1 and flops["full"] == 2 * 2 * 4 * dense
    assert dfa.attention_flops(plan, guided=False)["full"] == 2 * 4 * dense


@pytest.fixture(scope="module")
def calibrated(dit_pipe, tmp_path_factory):
    """Plans for the default DiT at 4 steps: threshold 0 and a large one, saved and loaded."""
    settings = dfa.CalibrationSettings(thresholds=(0.0, 0.5), window_sizes=(64,), steps=4)
    plans = dfa.calibrate_pipeline(dit_pipe, PROMPTS[:2], settings)
    path = tmp_path_factory.mktemp("dfa") / "ditfastattn.safetensors"
    dfa.save_plans(path, plans, {"prompts": 2})
    return plans, path


def _generate(pipe, steps=4):
    return pipe([PROMPTS[0]], steps=steps, sampler="ddim", guidance_scale=4.0, seed=3).pixels


def test_threshold_zero_keeps_full_attention_and_is_exact(dit_pipe, calibrated):
    plans, path = calibrated
    assert (plans[0].methods == dfa.FULL).all()
    base = _generate(dit_pipe)
    handle = sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0,window_size=64,calibration={path}")
    try:
        assert torch.equal(_generate(dit_pipe), base)
    finally:
        handle.remove()
    assert dfa.attention_flops(plans[0])["fraction"] == 1.0


def test_a_large_threshold_compresses(dit_pipe, calibrated):
    plans, path = calibrated
    plan = plans[1]
    assert (plan.methods != dfa.FULL).sum() > 0 and (plan.methods[0] <= dfa.FULL_CFG).all()   # full on step 0
    assert (plan.errors < 0.5).all()
    assert dfa.attention_flops(plan)["fraction"] < 0.9
    base = _generate(dit_pipe)
    handle = sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0.5,window_size=64,calibration={path}")
    try:
        fast = _generate(dit_pipe)
    finally:
        handle.remove()
    assert not torch.equal(fast, base) and torch.isfinite(fast).all()
    assert torch.equal(_generate(dit_pipe), base)


def test_plans_save_and_load(calibrated, dit_pipe):
    plans, path = calibrated
    for plan in plans:
        loaded = dfa.load_plan(path, 64, plan.threshold)
        assert torch.equal(loaded.methods, plan.methods) and torch.equal(loaded.errors, plan.errors)
        assert (loaded.units, loaded.tokens, loaded.width, loaded.pairs, loaded.denoiser) == \
            (plan.units, plan.tokens, plan.width, plan.pairs, "SD3Transformer2DModel")
    assert plans[0].tokens[0] > 256   # image and text tokens of the joint attention
    config = dfa.DiTFastAttnConfig(threshold=0.5, window_size=64, calibration=str(path))
    assert torch.equal(dfa.plans_for(dit_pipe.model.denoiser, config)[4].methods, plans[1].methods)


def test_one_file_holds_plans_for_several_step_counts_and_a_run_follows_its_own(dit_pipe, tmp_path):
    net = dit_pipe.model.denoiser
    three, four = _plan(net, [[dfa.FULL], [dfa.SHARE], [dfa.SHARE]]), _plan(net, [[dfa.FULL]] * 4)
    path = dfa.save_plans(tmp_path / "plans.safetensors", [three, four])
    assert dfa.load_plan(path, 2, 0.05, steps=3).steps == 3 and dfa.load_plan(path, 2, 0.05, steps=4).steps == 4
    with pytest.raises(UserError, match="plans for 3, 4 steps, not 5"):
        dfa.load_plan(path, 2, 0.05, steps=5)
    base = {n: _generate(dit_pipe, steps=n) for n in (3, 4)}
    handle = sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0.05,window_size=2,calibration={path}")
    try:
        assert torch.equal(_generate(dit_pipe, steps=4), base[4])       # the 4-step plan: full attention
        assert not torch.equal(_generate(dit_pipe, steps=3), base[3])   # the 3-step plan shares outputs
        with pytest.raises(UserError, match="plans were made for 3, 4 steps and this run has 5"):
            _generate(dit_pipe, steps=5)
    finally:
        handle.remove()


@pytest.mark.parametrize("spec, message", [
    ("ditfastattn:threshold=1", r"threshold must be a relative error in \[0, 1\).*got 1"),
    ("ditfastattn:threshold=-0.1", r"threshold must be a relative error in \[0, 1\).*got -0.1"),
    ("ditfastattn:window_size=0", r"window_size must be a whole number of tokens >= 1.*got 0"),
    ("ditfastattn:window_size=2.5", r"window_size must be a whole number"),
])
def test_bad_knobs_are_clear_errors(spec, message):
    model = tiny_transformers()[0][0]
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(model, spec)
    with pytest.raises(UserError, match="calibration needs --steps >= 2"):
        dfa.CalibrationSettings(steps=1)


def test_missing_foreign_or_mismatched_plans_are_clear_errors(dit_pipe, calibrated, tmp_path):
    _, path = calibrated
    sd3 = tiny_transformers()[0][0]
    with pytest.raises(UserError, match=r"ditfastattn needs a plan .*not loaded from a folder.*"
                                        r"sdinfer calibrate ditfastattn --model MODEL"):
        sdinfer.accelerate(sd3, "ditfastattn")
    with pytest.raises(UserError, match="there is none at .*none.safetensors"):
        sdinfer.accelerate(dit_pipe, f"ditfastattn:calibration={tmp_path / 'none.safetensors'}")
    with pytest.raises(UserError, match=r"no ditfastattn plan for window_size=64, threshold=0.05 .*"
                                        r"window_size=64,threshold=0, window_size=64,threshold=0.5.*--thresholds 0.05"):
        sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0.05,window_size=64,calibration={path}")
    with pytest.raises(UserError, match="made for a SD3Transformer2DModel with other attention layers"):
        sdinfer.accelerate(tiny_transformers()[2][0], f"ditfastattn:threshold=0.5,window_size=64,calibration={path}")
    handle = sdinfer.accelerate(dit_pipe, f"ditfastattn:threshold=0.5,window_size=64,calibration={path}")
    try:
        with pytest.raises(UserError, match="plans were made for 4 steps and this run has 5; .*--steps N"):
            _generate(dit_pipe, steps=5)
    finally:
        handle.remove()
    net = dit_pipe.model.denoiser
    assert not getattr(net, "_diffusers_hook", None) or not net._diffusers_hook.hooks


def test_the_greedy_plan_on_a_stock_pixart_pipeline():
    from tiny_pipelines import build_tiny_pixart

    from sdinfer.accelerate import steps_of

    pipe = build_tiny_pixart()

    def generate():
        return pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=4.0,
                    output_type="latent", use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    exact = dfa.greedy_plan(pipe.transformer, generate, 4, 4, 0.0, steps_of(pipe.scheduler))
    loose = dfa.greedy_plan(pipe.transformer, generate, 4, 4, 0.9, steps_of(pipe.scheduler))
    assert (exact.methods == dfa.FULL).all() and (loose.methods != dfa.FULL).any()
    assert exact.units == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]   # not the cross-attention
    assert torch.equal(generate(), base)   # calibration leaves nothing installed


def test_the_calibrate_command_writes_plans(tiny_pixart, tmp_path, capsys):
    from test_cli import run

    out = tmp_path / "plans.safetensors"
    code, stdout, err = run(capsys, "calibrate", "ditfastattn", "--model", str(tiny_pixart), "--samples", "2",
                            "--steps", "3", "--thresholds", "0,0.3", "--window-sizes", "4", "--out", str(out))
    assert code == 0, err
    assert "wrote 2 ditfastattn plans" in stdout and "threshold 0.3" in stdout
    assert (dfa.load_plan(out, 4, 0.0).methods == dfa.FULL).all()
    assert dfa.load_plan(out, 4, 0.3).steps == 3
    code, _, err = run(capsys, "calibrate", "ditfastattn", "--model", str(tiny_pixart), "--thresholds", "2",
                       "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "threshold must be a relative error in [0, 1)" in err


def test_it_composes_with_a_sampler_and_a_cache(dit_pipe, tmp_path):
    net = dit_pipe.model.denoiser
    path = dfa.save_plans(tmp_path / "plan.safetensors",
                          [_plan(net, [[dfa.FULL], [dfa.WINDOW_CFG], [dfa.SHARE], [dfa.FULL]], window_size=64)])
    fast = f"ditfastattn:window_size=64,threshold=0.05,calibration={path}"

    def run(spec=""):
        handle = sdinfer.accelerate(dit_pipe, spec) if spec else None
        try:
            return dit_pipe([PROMPTS[0]], steps=4, sampler="dpm-solver++", guidance_scale=4.0, seed=3).pixels
        finally:
            if handle is not None:
                handle.remove()
    base, alone, cached, both = run(), run(fast), run("fora:interval=2"), run(f"{fast} + fora:interval=2")
    assert torch.isfinite(both).all()
    assert not torch.equal(both, alone) and not torch.equal(both, cached) and not torch.equal(alone, base)
    assert torch.equal(run(), base)
