"""Where the last step lands: clean data (``final="zero"``) or the first training step
(``"sigma_min"``, as diffusers' DDIM and ``final_sigmas_type``), in the loop, the pipeline and the CLI."""

from __future__ import annotations

import pytest
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop


def test_ddim_to_sigma_min_renoises_its_last_prediction():
    """DDIM's last step to t_min is alpha x0 + sigma eps of the same evaluation that the step
    to clean data returns as x0 (DDIM, Song et al. 2021, Eq. 12 with eta = 0)."""
    sched = gm.schedule()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    x_zero = sample_loop(den, get_sampler("ddim"), x_T.clone(), 5, None, None,
                         callback=lambda i, x: seen.append(x))
    x_min = sample_loop(den, get_sampler("ddim"), x_T.clone(), 5, None, None, final="sigma_min")
    t_last = sched.continuous_time(199)  # trailing, 5 steps: 999, 799, 599, 399, 199
    t_min = sched.t_min
    eps = (seen[-2] - sched.alpha(t_last) * x_zero) / sched.sigma(t_last)
    expected = sched.alpha(t_min) * x_zero + sched.sigma(t_min) * eps
    assert torch.allclose(x_min, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(x_min, x_zero)


def test_sample_refuses_sigma_min_where_the_grid_has_its_own_end():
    import sdinfer

    sched = gm.schedule()
    x_T = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    for spacing, message in [("linspace", "linspace grid's last timestep is 0"), ("logsnr", "logsnr grid has its own end")]:
        with pytest.raises(ValueError, match=message):
            sdinfer.sample(gm.model_fn(sched), x_T, sched, "dpm-solver++", steps=5, prediction_type="sample",
                           spacing=spacing, final="sigma_min")


@pytest.mark.slow
def test_through_the_pipeline_and_the_cli(tmp_path, capsys):
    from PIL import Image

    from sdinfer.errors import UserError
    from sdinfer.pipeline import Pipeline
    from test_cli import run

    pipe = Pipeline.from_pretrained("unet")
    zero = pipe("a red circle", steps=4)
    at_min = pipe("a red circle", steps=4, final="sigma_min")
    assert at_min.nfe == zero.nfe == 4 and at_min.params["final"] == "sigma_min" and "final" not in zero.params
    assert 0 < (at_min.pixels - zero.pixels).abs().max() < 0.1
    with pytest.raises(UserError, match="unknown final time 'clean'"):
        pipe("a red circle", steps=4, final="clean")
    with pytest.raises(UserError, match="the karras grid has its own end"):
        pipe("a red circle", steps=4, spacing="karras", final="sigma_min")
    with pytest.raises(UserError, match="the gits grid has its own end"):
        pipe("a red circle", steps=4, spacing="gits", final="sigma_min")
    with pytest.raises(UserError, match="leading grid's last timestep is 0"):
        pipe("a red circle", steps=4, spacing="leading", final="sigma_min")
    out = tmp_path / "final.png"
    code, _, err = run(capsys, "generate", "a red circle", "--steps", "3", "--final", "sigma_min",
                       "-o", str(out), "--quiet")
    assert code == 0, err
    assert Image.open(out).text["final"] == "sigma_min"
    with pytest.raises(SystemExit):
        run(capsys, "generate", "a red circle", "--final", "clean", "-o", str(tmp_path / "x.png"))
    assert "invalid choice: 'clean'" in capsys.readouterr().err
