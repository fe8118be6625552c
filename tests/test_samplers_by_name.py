"""The samplers with their own loop (adaptive DPM-Solver-12/23, ParaDiGMS, ParaTAA) by name, through
``sdinfer.sample``, ``sample_loop``, the Pipeline and the CLI, against their direct functions on the
exact Gaussian-mixture model."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import SAMPLERS, get_sampler, sample_loop
from sdinfer.samplers.dpm_solver_singlestep import dpm_solver_adaptive
from sdinfer.samplers.paradigms import paradigms
from sdinfer.samplers.parataa import parataa


@pytest.fixture(scope="module")
def problem():
    sched = gm.schedule()
    x_T = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return sched, x_T


def _model(sched):
    fn = gm.model_fn(sched)
    return lambda x, t: fn(x, t, None)


def _den(sched):
    return Denoiser(gm.model_fn(sched), sched, "sample")


@pytest.mark.parametrize("name, order", [("dpm-solver-12", 2), ("dpm-solver-23", 3), ("dpm-solver-adaptive", 2)])
def test_adaptive_by_name_is_the_direct_function(problem, name, order):
    sched, x_T = problem
    direct = dpm_solver_adaptive(_den(sched), x_T.clone(), order=order, rtol=0.1, atol=0.01)
    # steps does not apply: the solver picks its own
    for steps in (3, 10):
        by_name = sdinfer.sample(_model(sched), x_T.clone(), sched, sampler=name, steps=steps,
                                 prediction_type="sample", rtol=0.1, atol=0.01)
        assert torch.equal(by_name, direct.x)
    den = _den(sched)
    sample_loop(den, get_sampler(f"{name}:rtol=0.1,atol=0.01"), x_T.clone(), 5, None, None)
    assert den.nfe == direct.nfe and direct.nfe != 5


def test_adaptive_options_by_name(problem):
    sched, x_T = problem
    direct = dpm_solver_adaptive(_den(sched), x_T.clone(), order=3, rtol=0.2, atol=0.02)
    by_name = sdinfer.sample(_model(sched), x_T.clone(), sched, sampler="dpm-solver-adaptive:order=3",
                             prediction_type="sample", rtol=0.2, atol=0.02)
    assert torch.equal(by_name, direct.x)
    with pytest.raises(ValueError, match="orders 2"):
        get_sampler("dpm-solver-adaptive:order=4")
    with pytest.raises(ValueError, match="no option"):
        get_sampler("dpm-solver-12:order=3")


@pytest.mark.parametrize("options", [{}, {"window": 5, "tolerance": 0.03}, {"drift": "ddpm", "window": 4}])
def test_paradigms_by_name_is_the_direct_function(problem, options):
    sched, x_T = problem
    direct = paradigms(_den(sched), x_T.clone(), 20, generator=torch.Generator().manual_seed(4), **options)
    by_name = sdinfer.sample(_model(sched), x_T.clone(), sched, sampler="paradigms", steps=20,
                             prediction_type="sample", generator=torch.Generator().manual_seed(4), **options)
    assert torch.equal(by_name, direct.x)
    den = _den(sched)
    spec = "paradigms" + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    sample_loop(den, get_sampler(spec), x_T.clone(), 20, None, None, generator=torch.Generator().manual_seed(4))
    # every step evaluated counts; the batched calls are the rounds
    assert (den.nfe, den.model_calls) == (direct.evaluations, direct.rounds)
    assert den.model_calls < 20 <= den.nfe


@pytest.mark.parametrize("options", [{}, {"memory": 2, "tolerance": 0.03}, {"memory": 0}])
def test_parataa_by_name_is_the_direct_function(problem, options):
    sched, x_T = problem
    direct = parataa(_den(sched), x_T.clone(), 20, **options)
    by_name = sdinfer.sample(_model(sched), x_T.clone(), sched, sampler="parataa", steps=20,
                             prediction_type="sample", **options)
    assert torch.equal(by_name, direct.x)
    den = _den(sched)
    sample_loop(den, get_sampler("parataa"), x_T.clone(), 20, None, None)
    assert den.model_calls == parataa(_den(sched), x_T.clone(), 20).rounds < 20


def test_callbacks_report_every_step_once(problem):
    sched, x_T = problem
    for spec in ("paradigms:window=6", "parataa", "ddim"):
        seen = []
        x = sample_loop(_den(sched), get_sampler(spec), x_T.clone(), 15, None, None,
                        callback=lambda i, x: seen.append((i, x)))
        assert [i for i, _ in seen] == list(range(15)), spec
        assert torch.equal(seen[-1][1], x), spec
    accepted = []
    res = dpm_solver_adaptive(_den(sched), x_T.clone(), rtol=0.2, atol=0.02)
    sample_loop(_den(sched), get_sampler("dpm-solver-12:rtol=0.2,atol=0.02"), x_T.clone(), 4, None, None,
                callback=lambda i, x: accepted.append(i))
    assert accepted == list(range(res.accepted))


def test_own_loop_samplers_refuse_what_needs_single_steps(problem):
    from sdinfer.samplers.diffusers_scheduler import SdinferScheduler

    sched, x_T = problem
    for name in ("paradigms", "parataa", "dpm-solver-12"):
        with pytest.raises(ValueError, match="analytic first step"):
            sample_loop(_den(sched), get_sampler(name), x_T.clone(), 5, None, None, analytic_first_step=True)
        with pytest.raises(ValueError, match="its own loop"):
            get_sampler(f"{name}:0-5,ddim:5-10")
        with pytest.raises(ValueError, match="its own loop"):
            SdinferScheduler(sampler=name)
    with pytest.raises(ValueError, match="window >= 1"):
        get_sampler("paradigms:window=0")
    with pytest.raises(ValueError, match="ddim, ddpm"):
        get_sampler("paradigms:drift=plms")
    with pytest.raises(ValueError, match="memory >= 0"):
        get_sampler("parataa:memory=-1")


def test_the_registry_names_them():
    assert {"dpm-solver-12", "dpm-solver-23", "dpm-solver-adaptive", "paradigms", "parataa"} <= set(SAMPLERS)


def test_pipeline_runs_paradigms_by_name(default_pipe):
    ddim = default_pipe("a red circle in the top left", steps=4, sampler="ddim")
    exact = default_pipe("a red circle in the top left", steps=4, sampler="paradigms:window=1")
    assert exact.nfe == exact.model_calls == 4
    torch.testing.assert_close(exact.pixels, ddim.pixels, rtol=0, atol=2e-3)
    par = default_pipe("a red circle in the top left", steps=4, sampler="paradigms:tolerance=0.5")
    assert par.params["sampler"] == "paradigms:tolerance=0.5" and par.model_calls < 4 <= par.nfe
    assert float((par.pixels - ddim.pixels).abs().mean()) < 0.05


def test_accelerators_refuse_samplers_with_their_own_loop(default_pipe):
    from sdinfer.errors import UserError

    handle = sdinfer.accelerate(default_pipe, "deepcache:interval=2")
    try:
        for name in ("paradigms", "parataa", "dpm-solver-23"):
            with pytest.raises(UserError, match="its own loop over the steps"):
                default_pipe("a red circle", steps=4, sampler=name)
    finally:
        handle.remove()
    assert default_pipe("a red circle", steps=2, sampler="parataa").nfe >= 2


@pytest.mark.slow
def test_cli_generates_with_an_adaptive_sampler(tmp_path, capsys):
    from PIL import Image
    from test_cli import run

    out = tmp_path / "adaptive.png"
    spec = "dpm-solver-12:rtol=0.5,atol=0.05"
    code, stdout, err = run(capsys, "generate", "a red circle in the top left", "--sampler", spec,
                            "--steps", "5", "-o", str(out), "--quiet")
    assert code == 0, err
    assert Image.open(out).text["sampler"] == spec
    nfe = int(stdout.split(" NFE")[0].rsplit(" ", 1)[-1])
    assert nfe > 0 and nfe != 5   # the solver's own evaluations, not the steps asked for
