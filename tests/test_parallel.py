"""ParaDiGMS against sequential DDIM / DDPM on the exact Gaussian-mixture model."""

import pytest
import torch

from sdinfer.eval import gaussian_mixture as gm
from sdinfer.denoiser import Denoiser
from sdinfer.samplers import DDIM, sample_loop
from sdinfer.samplers.paradigms import paradigms


@pytest.fixture(scope="module")
def setup():
    sched = gm.schedule()
    x_T = torch.randn(32, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return sched, x_T


def test_paradigms_ddim_100_steps(setup):
    sched, x_T = setup
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 100, None, None)
    res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100, window=20,
                    tolerance=0.03)
    assert res.rounds <= 100 / 3, res.rounds       # measured: 11 rounds, 171 evaluations
    assert res.evaluations >= 100
    assert float((res.x - seq).abs().max()) < 0.02  # measured: 0.0041 (data scale ~1)


def test_paradigms_is_exact_with_a_window_of_one(setup):
    sched, x_T = setup
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 30, None, None)
    res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 30, window=1)
    assert res.rounds == 30
    torch.testing.assert_close(res.x, seq, rtol=1e-12, atol=1e-12)


def test_paradigms_tighter_tolerance_is_closer(setup):
    sched, x_T = setup
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 100, None, None)
    errs, rounds = [], []
    for tol in (0.1, 0.03, 0.003):
        res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100, window=20,
                        tolerance=tol)
        errs.append(float((res.x - seq).abs().max()))
        rounds.append(res.rounds)
    assert errs[0] >= errs[1] >= errs[2] and rounds[0] <= rounds[1] <= rounds[2]


def test_paradigms_ddpm_window_one_matches_sequential_noise(setup):
    sched, x_T = setup
    steps = 20
    noise = torch.randn((steps, *x_T.shape), generator=torch.Generator().manual_seed(3), dtype=x_T.dtype)

    res = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), steps, window=1,
                    drift="ddpm", generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    from sdinfer.samplers import continuous_grid
    from sdinfer.context import StepContext
    times = continuous_grid(den, steps)
    for i in range(steps):
        pred = den(x, times[i], None, None, StepContext(i, steps, times[i], 0.0))
        ab_t, ab_n = float(sched.alpha(times[i])) ** 2, float(sched.alpha(times[i + 1])) ** 2
        r = ab_t / ab_n
        mean = (ab_n**0.5 * (1 - r) / (1 - ab_t)) * pred.x0 + (r**0.5 * (1 - ab_n) / (1 - ab_t)) * x
        x = mean + max((1 - ab_n) / (1 - ab_t) * (1 - r), 0.0) ** 0.5 * noise[i]
    torch.testing.assert_close(res.x, x, rtol=1e-10, atol=1e-10)


def test_bad_options(setup):
    sched, x_T = setup
    with pytest.raises(ValueError, match="ParaDiGMS runs on"):
        paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T, 10, drift="plms")
    with pytest.raises(ValueError, match="window"):
        paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T, 10, window=0)


def test_the_mixture_model_takes_one_time_per_sample(setup):
    """Parallel samplers evaluate many steps in one call: each sample at its own time."""
    sched, x_T = setup
    fn = gm.model_fn(sched)
    t = torch.tensor([900.0, 100.0], dtype=torch.float64)
    both = fn(x_T[:2], t)
    torch.testing.assert_close(both[:1], fn(x_T[:1], t[:1]))
    torch.testing.assert_close(both[1:], fn(x_T[1:2], t[1:]))


def test_parataa_ddim_100_steps(setup):
    from sdinfer.samplers.parataa import parataa

    sched, x_T = setup
    seq = sample_loop(Denoiser(gm.model_fn(sched), sched, "sample"), DDIM(), x_T.clone(), 100, None, None)
    taa = parataa(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100, tolerance=0.03)
    picard = parataa(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100, tolerance=0.03,
                     memory=0)
    assert taa.rounds <= 100 / 3, taa.rounds
    err_taa = float((taa.x - seq).abs().max())
    err_picard = float((picard.x - seq).abs().max())
    assert taa.rounds <= picard.rounds
    assert max(err_taa, err_picard) < 1e-2, (err_taa, err_picard)   # data of scale 1
    # without memory it is ParaDiGMS with one window over all steps, round for round
    window = paradigms(Denoiser(gm.model_fn(sched), sched, "sample"), x_T.clone(), 100, window=100,
                       tolerance=0.03)
    assert (picard.rounds, picard.evaluations) == (window.rounds, window.evaluations)
    torch.testing.assert_close(picard.x, window.x, rtol=0, atol=1e-12)


def test_parataa_bad_input(setup):
    from sdinfer.samplers.parataa import parataa

    sched, x_T = setup
    with pytest.raises(ValueError, match="tolerance"):
        parataa(Denoiser(gm.model_fn(sched), sched, "sample"), x_T, 10, tolerance=0)
