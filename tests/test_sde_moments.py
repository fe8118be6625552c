"""Stochastic samplers draw from the data distribution: their samples' moments match the
exact Gaussian mixture's within sampling error."""

import pytest
import torch

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop

N = 4000


def _true_moments():
    w, mu, s = gm.WEIGHTS, gm.MEANS, gm.STDS
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (s[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64)
                                  + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize("spec", ["ddpm", "ddim:eta=1", "dpm-solver++-sde", "sampler-scheduler"])
def test_stochastic_sampler_matches_the_mixture_moments(spec):
    sched = gm.schedule()
    x_T = torch.randn(N, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    x = sample_loop(den, get_sampler(spec), x_T, 100, None, None,
                    generator=torch.Generator().manual_seed(6)).view(N, 2)
    mean, cov = _true_moments()
    se_mean = (torch.diagonal(cov) / N).sqrt()
    assert ((x.mean(0) - mean).abs() <= 4 * se_mean).all(), (x.mean(0), mean)
    emp = torch.cov(x.T)
    # the standard error of a covariance entry is about sqrt((s_ii s_jj + s_ij^2) / N)
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov**2) / N).sqrt()
    assert ((emp - cov).abs() <= 4 * se_cov).all(), (emp, cov)


def test_moment_check_fails_on_a_wrong_distribution():
    """The check has power: samples that ignore one mixture component fail it."""
    mean, cov = _true_moments()
    g = torch.Generator().manual_seed(7)
    x = gm.MEANS[1] + gm.STDS[1] * torch.randn(N, 2, dtype=torch.float64, generator=g)
    se_mean = (torch.diagonal(cov) / N).sqrt()
    assert not ((x.mean(0) - mean).abs() <= 4 * se_mean).all()
