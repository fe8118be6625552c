"""TFM-PTQ: finite-set (per-timestep) activation scales chosen by the step context, the temporal
layers' scales on the calibration trajectory's timesteps, W4A8 closer to full precision than
round to nearest, and its config's errors."""

import pytest
import torch
import torch.nn.functional as F

from sdinfer.context import StepContext, step_context
from sdinfer.errors import UserError
from sdinfer.quant import CalibrationConfig, parse_spec, quantize, temporal_names
from sdinfer.quant.calibration import calibration_for
from sdinfer.quant.tfm_ptq import TFMPTQConfig

TINY = CalibrationConfig(prompts=2, steps=4)


@pytest.fixture(scope="module")
def tfm_unet(unet_pipe):
    """(handle, calibration timesteps, temporal names) of a tiny TFM-PTQ W4A8 on the default UNet."""
    from sdinfer.accelerate import denoiser_of

    model, _ = denoiser_of(unet_pipe)
    times = calibration_for(unet_pipe, model, TINY).timesteps()
    temporal = temporal_names(model)
    handle = quantize(unet_pipe, "tfm-ptq:weights=int4,iters=5", TINY)
    yield handle, times, temporal
    handle.remove()


def test_step_context_picks_the_timesteps_activation_scale(tfm_unet):
    handle, times, _ = tfm_unet
    layer = handle.layers["time_embedding.linear_1"]
    act = layer.act
    assert act.per_timestep and act.scales.numel() == len(times)
    x = torch.randn(3, layer.weight_shape[1]) * 2
    w = layer.dequantized_weight()
    outs = []
    for i in (0, len(times) - 1):
        ctx = StepContext(step_index=i, num_steps=len(times), t=0.5, model_t=times[i] + 0.3)
        with step_context(ctx):
            assert act.index_at(ctx.model_t) == i
            got = layer(x)
        scale, offset = act.scales[i], act.offsets[i]
        expected = F.linear(act.format.round((x - offset) / scale) * scale + offset, w, layer.bias)
        assert torch.allclose(got, expected, atol=1e-5)
        outs.append(got)
    assert act.scales[0] != act.scales[-1]
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="no step context"):
        layer(x)


def test_temporal_layers_carry_one_scale_per_calibration_timestep(tfm_unet):
    handle, times, temporal = tfm_unet
    assert temporal and temporal <= set(handle.layers)
    for name in temporal:
        act = handle.layers[name].act
        assert torch.equal(act.times, torch.tensor(times, dtype=torch.float32)), name
        assert (act.scales > 0).all()
    assert handle.layers["time_embedding.linear_1"].format_name == "int4"


def test_bad_config_names_the_allowed_values():
    with pytest.raises(UserError, match="tfm-ptq takes weights int8 or int4"):
        parse_spec("tfm-ptq:weights=int3")
    with pytest.raises(UserError, match="activations int8"):
        TFMPTQConfig(activations="fp8")
    with pytest.raises(UserError, match="iters"):
        TFMPTQConfig(iters=0)
    assert TFMPTQConfig().needs_calibration and parse_spec("tfm-ptq:weights=int8").weights == "int8"


@pytest.mark.slow
def test_w4a8_is_closer_to_full_precision_than_rtn():
    """A pipeline of its own: the shared one carries this module's quantized fixture."""
    from sdinfer.eval.metrics import psnr
    from sdinfer.eval.prompts import validation_prompts
    from sdinfer.pipeline import Pipeline

    unet_pipe = Pipeline.from_pretrained("unet")
    prompts = validation_prompts(6)
    ref = unet_pipe(prompts, steps=10, seed=1).pixels
    calib = CalibrationConfig(prompts=4, steps=10)
    scores = {}
    for spec in ("rtn:weights=int4,activations=int8", "tfm-ptq:weights=int4,iters=60"):
        handle = quantize(unet_pipe, spec, calib)
        try:
            scores[spec] = psnr(unet_pipe(prompts, steps=10, seed=1).pixels, ref)
        finally:
            handle.remove()
    rtn, tfm = scores.values()
    assert tfm > rtn + 1.0, scores
