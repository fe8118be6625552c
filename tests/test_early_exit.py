"""Early exit (ASE): the schedule maps t to the skipped units; a skipped unit returns its input;
nothing skipped on the original weights is exact; the fine-tuned weights swap in and out bit for
bit; tiny diffusers transformers, UNets and stock pipelines, the default models; clear errors;
the fine-tuning resumes exactly."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.cache.base import CacheHandle
from sdinfer.context import StepContext, step_context
from sdinfer.distill import early_exit
from sdinfer.distill.early_exit import ExitControl, ExitSchedule, install_skips, save_weights, skip_units
from sdinfer.errors import UserError

from cache_helpers import CallCounter, tiny_transformers

PROMPT = "a red circle in the top left"


def _ctx(model_t: float) -> StepContext:
    return StepContext(step_index=0, num_steps=1, t=model_t / 1000, model_t=model_t)


def _generate(pipe, spec=None, steps=2):
    handle = sdinfer.accelerate(pipe, spec) if spec else None
    try:
        return pipe([PROMPT], steps=steps, sampler="ddim", guidance_scale=4.0, seeds=[0]).pixels
    finally:
        if handle is not None:
            handle.remove()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed_weights(model, file, schedule="2/1/0"):
    """A weights file of ``model`` with every float tensor nudged (as a fine-tuning would)."""
    original = _state(model)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(0.01)
    save_weights(file, model, ExitSchedule.parse(schedule), {"steps": 1}, dtype=torch.float32)
    model.load_state_dict(original)
    return file


# ---- the schedule -----------------------------------------------------------------------------
def test_the_schedule_maps_t_to_the_skipped_units():
    s = ExitSchedule.parse("2/1/0")
    assert [s.skipped(x) for x in (0.0, 0.2, 0.34, 0.5, 0.67, 0.99, 1.0, 1.5, -1)] == [2, 2, 1, 1, 0, 0, 0, 0, 2]
    assert s.text() == "2/1/0" and ExitSchedule.parse("none").skipped(0.3) == 0
    assert s.saved_fraction([1.0, 1.0, 2.0]) == pytest.approx((2 + 1 + 0) / (3 * 4))
    model = tiny_transformers()[0][0]
    units = [n for n, _ in skip_units(model)]
    assert units == ["transformer_blocks.1", "transformer_blocks.0"]   # the last block first
    ExitSchedule.parse("2/0").check(len(units))
    with pytest.raises(UserError, match="at most 2"):
        ExitSchedule.parse("3/0").check(len(units))


@pytest.mark.parametrize("text", ["2,1", "a/b", "", "1//2", "-1/0"])
def test_bad_schedule_text_is_a_clear_error(text):
    with pytest.raises(UserError, match="K0/K1"):
        ExitSchedule.parse(text)


def test_unet_units_go_deepest_first_and_keep_their_shapes(tiny_sd):
    from diffusers import UNet2DConditionModel

    from sdinfer.pipeline import Pipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    assert [n for n, _ in skip_units(unet)] == ["mid_block", "up_blocks.1.attentions.1", "up_blocks.1.attentions.0",
                                                    "down_blocks.0.attentions.0"]
    default = Pipeline.from_pretrained("unet").model.denoiser
    names = [n for n, _ in skip_units(default)]
    assert names[:4] == ["mid_block", "up_blocks.0.attentions.1", "up_blocks.0.attentions.0",
                         "down_blocks.2.attentions.0"]
    assert names[-1] == "down_blocks.1.attentions.0" and len(names) == 7


# ---- skipping ---------------------------------------------------------------------------------
def test_a_skipped_block_returns_its_input_and_does_not_run():
    (sd3, call, _), *_ = tiny_transformers()
    blocks = sd3.transformer_blocks
    seen = {}
    blocks[1].register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    control = ExitControl(ExitSchedule((0,)))
    handle = CacheHandle("early-exit")
    install_skips(sd3, control, handle)
    counter = CallCounter(blocks[1].ff)
    try:
        control.forced = 1
        with torch.no_grad():
            out = blocks[1](hidden_states=torch.ones(1, 16, 16) * 3, encoder_hidden_states=torch.ones(1, 3, 16),
                            temb=torch.ones(1, 16))
            assert counter.calls == 0
            assert out[0] is None and torch.equal(out[1], torch.ones(1, 16, 16) * 3)   # context_pre_only
            out = blocks[0](hidden_states=torch.ones(1, 16, 16), encoder_hidden_states=torch.zeros(1, 3, 16),
                            temb=torch.ones(1, 16))
            assert not torch.equal(out[1], torch.ones(1, 16, 16))   # not skipped: it ran
            skipped = call(torch.tensor([500.0]))
            control.forced = 0
            full = call(torch.tensor([500.0]))
        assert counter.calls == 1 and not torch.equal(skipped, full)
    finally:
        handle.remove()


@pytest.mark.parametrize("index", [0, 2])
def test_tiny_transformers_skip_by_the_step_context(tmp_path, index):
    model, call, leaf = tiny_transformers()[index]
    with torch.no_grad():
        base = {t: call(torch.tensor([t])) for t in (100.0, 900.0)}
    counter = CallCounter(leaf)
    handle = sdinfer.accelerate(model, "early-exit:weights=original,schedule=1/0")
    try:
        with torch.no_grad():
            with step_context(_ctx(100.0)):
                low = call(torch.tensor([100.0]))
            assert counter.calls == 0
            with step_context(_ctx(900.0)):
                high = call(torch.tensor([900.0]))
            assert counter.calls == 1
    finally:
        handle.remove()
    assert torch.equal(high, base[900.0]) and not torch.equal(low, base[100.0])


def test_a_stock_stable_diffusion_pipeline_reads_t_from_the_step_tracker(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    counter = CallCounter(pipe.unet.mid_block.resnets[0].conv1)

    def generate():
        return pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    for schedule, calls, exact in [("none", 4, True), ("1/0", 2, False), ("1", 0, False)]:
        counter.calls = 0
        handle = sdinfer.accelerate(pipe, f"early-exit:weights=original,schedule={schedule}")
        try:
            out = generate()
        finally:
            handle.remove()
        assert counter.calls == calls and torch.equal(out, base) == exact
    assert torch.equal(generate(), base)


# ---- exactness and the weights ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dit", "unet"])
def test_nothing_skipped_on_the_original_weights_is_bit_identical(dit_pipe, unet_pipe, which):
    pipe = dit_pipe if which == "dit" else unet_pipe
    base = _generate(pipe)
    assert torch.equal(_generate(pipe, "early-exit:weights=original,schedule=none"), base)
    assert not torch.equal(_generate(pipe, "early-exit:weights=original,schedule=2"), base)
    assert torch.equal(_generate(pipe), base)


def test_the_original_weights_take_the_trained_schedule_by_default(dit_pipe):
    from sdinfer.distill import early_exit as ee

    net = dit_pipe.model.denoiser
    trained = ee.read_weights(net, ee.weights_file(net, ""))[1]["schedule"]
    assert trained != "none"
    assert torch.equal(_generate(dit_pipe, "early-exit:weights=original"),
                       _generate(dit_pipe, f"early-exit:weights=original,schedule={trained}"))


def test_apply_and_remove_swap_the_weights_exactly(dit_pipe, tmp_path):
    model = dit_pipe.model.denoiser
    file = _perturbed_weights(model, tmp_path / "ee.safetensors")
    before = _state(model)
    base = _generate(dit_pipe)
    handle = sdinfer.accelerate(dit_pipe, f"early-exit:weights={file},schedule=none")
    try:
        inside = _state(model)
        assert all(torch.equal(inside[k], before[k] + 0.01) for k in before if before[k].is_floating_point())
    finally:
        handle.remove()
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_generate(dit_pipe), base)


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_the_shipped_weights_run_on_the_default_models(dit_pipe, unet_pipe, which):
    pipe = dit_pipe if which == "dit" else unet_pipe
    model = pipe.model.denoiser
    file = early_exit.weights_file(model, "")
    tensors, meta = early_exit.read_weights(model, file)
    schedule = ExitSchedule.parse(meta["schedule"])
    assert max(schedule.counts) > 0 and int(meta["steps"]) > 0
    before, base = _state(model), _generate(pipe)
    first = skip_units(model)[0][1]
    counter = CallCounter(next(m for m in first.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))))
    out = _generate(pipe, "early-exit", steps=6)
    assert counter.calls < 6   # some of the 6 (batched-guidance) calls skipped the first unit
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_missing_and_foreign_weights_are_clear_errors(dit_pipe, unet_pipe, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with pytest.raises(UserError, match="sdinfer distill early-exit --model MODEL"):
        sdinfer.accelerate(unet, "early-exit")
    file = _perturbed_weights(dit_pipe.model.denoiser, tmp_path / "dit.safetensors")
    before = _state(unet_pipe.model.denoiser)
    with pytest.raises(UserError, match="for a SD3Transformer2DModel, not this UNet2DConditionModel"):
        sdinfer.accelerate(unet_pipe, f"early-exit:weights={file}")
    assert all(torch.equal(v, before[k]) for k, v in _state(unet_pipe.model.denoiser).items())
    with pytest.raises(UserError, match="K0/K1"):
        sdinfer.accelerate(unet_pipe, "early-exit:weights=original,schedule=x")
    with pytest.raises(UserError, match="weights=original takes the trained schedule .* give schedule="):
        sdinfer.accelerate(unet, "early-exit:weights=original")
    with pytest.raises(UserError, match="not a readable"):
        (tmp_path / "bad.safetensors").write_bytes(b"junk")
        sdinfer.accelerate(unet_pipe, f"early-exit:weights={tmp_path / 'bad.safetensors'}")


# ---- training ----------------------------------------------------------------------------------
def test_the_schedule_is_derived_under_the_budget():
    import numpy as np

    from sdinfer.distill.early_exit_train import derive_schedule

    errors = np.array([[0, 0.1, 0.2], [0, 0.5, 0.9], [0, 0.05, 0.6]])
    s = derive_schedule(errors, [1.0, 1.0], budget=0.3)
    assert s.saved_fraction([1.0, 1.0]) >= 0.3 and s.counts == (1, 0, 1)
    assert derive_schedule(errors, [1.0, 1.0], budget=0.0).counts == (0, 0, 0)


def test_training_resumes_exactly(tmp_path):
    from sdinfer.distill.early_exit_train import EarlyExitTrainConfig, train

    cfg = dict(model="dit", schedule="1/0", buckets=2, steps=4, batch_size=2, measure_batch=1, checkpoint_every=2)
    straight = train(EarlyExitTrainConfig(**cfg), tmp_path / "straight")
    first = train(EarlyExitTrainConfig(**cfg), tmp_path / "resumed", stop_at=2)
    assert first.step == 2
    resumed = train(EarlyExitTrainConfig(**cfg), tmp_path / "resumed")
    assert resumed.step == straight.step == 4
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="another configuration"):
        train(EarlyExitTrainConfig(**{**cfg, "lr": 1.0}), tmp_path / "resumed")
    out = resumed.export(tmp_path / "ee.safetensors")
    tensors, meta = early_exit.read_weights(resumed.net, out)
    assert meta["schedule"] == "1/0" and meta["steps"] == "4" and tensors


def test_the_skip_errors_are_measured_end_to_end_per_bucket(dit_pipe):
    from sdinfer.distill.early_exit_train import Batches, skip_errors

    batches = Batches(dit_pipe, seed=0, batch_size=1, caption_dropout=0.0)
    batches.measure_batch = 1
    errors = skip_errors(dit_pipe, batches, buckets=2, max_skip=1, steps=2)
    assert errors.shape == (2, 2) and (errors[:, 0] == 0).all() and (errors[:, 1] > 0).all()
    assert not early_exit_hooks(dit_pipe.model.denoiser)   # the measurement's hooks are gone


def early_exit_hooks(model) -> list[str]:
    from sdinfer.cache.base import installed_hooks

    return [name for _, unit in skip_units(model) for name in installed_hooks(unit) if "early" in name]
