"""The analytic first step: exact for Gaussian data, one model evaluation saved, better at low NFE
on the mixture, and through the pipeline and the CLI."""

from __future__ import annotations

import pytest
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop


def _gaussian_data_model(sched):
    """The exact denoiser of standard Gaussian data, as an x0 predictor in model timesteps."""
    def fn(x, model_t, text=None):
        t = sched.continuous_time(model_t)
        a = sched.alpha(t).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        s = sched.sigma(t).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return a * x / (a * a + s * s)
    return fn


@pytest.mark.parametrize("spec", ["ddim", "dpm-solver++", "unipc", "heun", "plms"])
def test_exact_for_gaussian_data_and_one_evaluation_saved(spec):
    sched = gm.schedule()
    x_T = torch.randn(8, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = Denoiser(_gaussian_data_model(sched), sched, "sample")
    afs = Denoiser(_gaussian_data_model(sched), sched, "sample")
    a = sample_loop(plain, get_sampler(spec), x_T.clone(), 6, None, None)
    b = sample_loop(afs, get_sampler(spec), x_T.clone(), 6, None, None, analytic_first_step=True)
    assert torch.allclose(a, b, rtol=0, atol=1e-10)
    assert afs.nfe == plain.nfe - 1


def test_it_buys_accuracy_at_low_nfe_on_the_mixture():
    """Measured (DDIM, trailing grid, NFE 5 / 6 / 8 / 10 at NFE + 1 steps against NFE steps):
    mean squared errors 0.67 / 0.72 / 0.78 / 0.83 of the plain sampler's."""
    sched = gm.schedule()
    x_T = torch.randn(128, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(steps, afs):
        den = Denoiser(gm.model_fn(sched), sched, "sample")
        x = sample_loop(den, get_sampler("ddim"), x_T.clone(), steps, None, None, analytic_first_step=afs)
        return x, den.nfe

    ref, _ = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), get_sampler("dpm-solver++:order=3"),
                         x_T.clone(), 500, None, None, spacing="logsnr"), None
    for nfe in (5, 6, 8, 10):
        plain, n_plain = run(nfe, False)
        afs, n_afs = run(nfe + 1, True)
        assert n_plain == n_afs == nfe
        assert (afs - ref).square().mean() < 0.9 * (plain - ref).square().mean(), nfe


@pytest.mark.slow
def test_through_the_pipeline_and_the_cli(tmp_path, capsys):
    from PIL import Image

    from sdinfer.errors import UserError
    from sdinfer.pipeline import Pipeline
    from test_cli import run

    pipe = Pipeline.from_pretrained("unet")
    result = pipe("a red circle", steps=4, analytic_first_step=True)
    assert result.nfe == 3 and result.params["analytic_first_step"] is True
    with pytest.raises(UserError, match="at least 2 steps"):
        pipe("a red circle", steps=1, analytic_first_step=True)
    with pytest.raises(UserError, match="not with SamplerSchedule"):
        pipe("a red circle", steps=4, sampler="ddim:0-2,dpm-solver++:2-4", analytic_first_step=True)
    out = tmp_path / "afs.png"
    code, _, err = run(capsys, "generate", "a red circle", "--steps", "3", "--analytic-first-step",
                       "--spacing", "trailing", "-o", str(out), "--quiet")
    assert code == 0, err
    text = Image.open(out).text
    assert text["analytic_first_step"] == "True" and text["spacing"] == "trailing"
