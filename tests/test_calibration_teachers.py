"""Calibration measures samplers against an accurate reference: on the guided mixture (guidance
7.5, exact by scipy) the errors ``choose_corrector`` ranks, the step costs of the GITS teacher and
the learned-grid teacher's errors are the errors against the exact solution, to far below the
differences they rank (the old references, 200 steps of DPM-Solver++, were 3e-4 - 1e-2 off).
Also: a learned grid stays within the model's times, and a non-finite error is no crash."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import guided_mixture as gmx
from sdinfer import calibrate
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.base import continuous_grid
from sdinfer.samplers.dpm_solver_v3 import CORRECTOR_MODES, DPMSolverV3
from sdinfer.samplers.ems import EMS
from sdinfer.samplers.optimal_grid import compute_grid
from sdinfer.samplers.reference import TOLERANCE

GUIDANCE = 7.5
CLOSE = 2e-6    # the reference's tolerance is 1e-5 between solves; its own error ~ 1/15 of that


def test_choose_corrector_ranks_errors_against_the_exact_solution():
    den, x_T, cond, uncond = gmx.problem(GUIDANCE, 64, 11)
    exact = gmx.exact(GUIDANCE, x_T)
    ems = EMS.degenerate(-8.0, 8.0, shape=(1, 1, 1))
    nfes = (5, 10, 20)
    meta = calibrate.choose_corrector(den, ems, x_T, cond, uncond, nfes=nfes, reference_tolerance=TOLERANCE)
    assert meta["corrector_selection"]["reference"].startswith("RK4 in lambda")
    for mode in CORRECTOR_MODES:
        for n, reported in zip(nfes, meta["corrector_selection"]["rms"][mode]):
            out = sample_loop(den, DPMSolverV3(stats=ems, use_corrector=mode), x_T.clone(), n, cond, uncond)
            assert abs(reported - gmx.rms(out, exact)) < CLOSE, (mode, n)


def test_the_gits_teacher_is_the_exact_solution():
    den, x_T, cond, uncond = gmx.problem(GUIDANCE, 32, 12)
    grid = compute_grid(den, x_T, cond, uncond, points=8)
    nodes = grid.nodes.tolist()
    exact = gmx.exact_states(GUIDANCE, x_T, nodes[1:-1]) + [gmx.exact(GUIDANCE, x_T)]
    sched = den.schedule
    a, s = float(sched.alpha(1.0)), float(sched.sigma(1.0))
    x0 = gmx.x0_guided(x_T.view(-1, 2), a, s, GUIDANCE).view_as(x_T)
    eps = (x_T - a * x0) / s
    # cost[0, j]: a DDIM step from the noise (exact) to node j against the teacher's state there
    for j, (t, state) in enumerate(zip(nodes[1:], exact), start=1):
        guess = x0 if t == 0.0 else float(sched.alpha(t)) * x0 + float(sched.sigma(t)) * eps
        assert abs(float(grid.cost[0, j]) - gmx.rms(guess, state)) < CLOSE, t
    assert grid.meta["teacher"].startswith("RK4 in lambda") and "refine" not in grid.meta


class MixturePipe:
    """What ``calibrate_learned_grids`` needs of a pipeline, on the guided mixture: text 1 is
    the condition, "" the unconditional, noise per seed."""

    def __init__(self, path, guidance_model=gmx.model_fn):
        self.sched = gm.schedule()
        self.model = SimpleNamespace(schedule=self.sched, path=path, name="mixture")
        self.model_fn = guidance_model(self.sched)

    def encode(self, texts):
        return torch.tensor([[0.0 if t == "" else 1.0] for t in texts], dtype=torch.float64)

    def noise(self, seeds, size):
        return torch.cat([torch.randn(1, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                          for s in seeds])

    def check_size(self, size):
        return size

    def denoiser(self, guidance_scale):
        from sdinfer.denoiser import Denoiser
        return Denoiser(self.model_fn, self.sched, "sample", guidance_scale=guidance_scale)

    def attach_statistics(self, solver, guidance_scale):
        pass


def _noise_and_exact(pipe, first_seed, n):
    x = pipe.noise([first_seed + i for i in range(n)], None)
    return x, gmx.exact(GUIDANCE, x)


def test_the_learned_grid_teacher_is_the_exact_solution(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "START_SPACINGS", ("trailing", "logsnr"))
    monkeypatch.setattr(calibrate, "REFERENCE_TOLERANCE", TOLERANCE)   # an exact model: the tight default
    pipe = MixturePipe(tmp_path)
    grids = calibrate.calibrate_learned_grids(pipe, GUIDANCE, "dpm-solver++", [6], ["a"] * 24, ["b"] * 24,
                                              max_evals=6)
    info = grids.meta["entries"]["dpm-solver++|6"]
    assert info["teacher"].startswith("RK4 in lambda")
    first = calibrate.LEARNED_SEED_OFFSET
    x_train, exact_train = _noise_and_exact(pipe, first, 24)
    x_valid, exact_valid = _noise_and_exact(pipe, first + calibrate.VALIDATION_SEED_OFFSET, 24)
    cond, uncond = pipe.encode(["a"] * 24), pipe.encode([""] * 24)
    den = pipe.denoiser(GUIDANCE)
    for x, exact, key in ((x_train, exact_train, "train_start"), (x_valid, exact_valid, "validation_start")):
        out = sample_loop(den, get_sampler("dpm-solver++"), x.clone(), 6, cond, uncond, spacing=info["start"])
        assert abs(info[key] - gmx.rms(out, exact)) < CLOSE, key


@pytest.mark.parametrize("failure", ["inf", "nan", "model"])
def test_a_grid_on_which_the_solver_diverges_loses_instead_of_crashing(tmp_path, monkeypatch, failure):
    """Off the trailing grid the solver's output is not finite (or the model's, which the
    denoiser raises as FloatingPointError): those grids lose, the trailing one is kept; when every
    start diverges, one UserError."""
    from sdinfer.errors import UserError

    real = calibrate.sample_loop
    trailing = continuous_grid(MixturePipe(tmp_path).denoiser(GUIDANCE), 4, "trailing")

    def diverging(den, solver, x, steps, c, u, spacing=None, **kw):
        out = real(den, solver, x, steps, c, u, spacing=spacing, **kw)
        if spacing.times(steps) == trailing and failure != "all":
            return out
        if failure == "model" or failure == "all":
            raise FloatingPointError("the model returned NaN or inf at step 2")
        return torch.full_like(out, float(failure))

    monkeypatch.setattr(calibrate, "START_SPACINGS", ("logsnr", "trailing"))
    monkeypatch.setattr(calibrate, "REFERENCE_TOLERANCE", 1e-3)   # the teacher is not what is tested here
    monkeypatch.setattr(calibrate, "sample_loop", diverging)
    pipe = MixturePipe(tmp_path)
    grids = calibrate.calibrate_learned_grids(pipe, GUIDANCE, "ddim", [4], ["a"] * 4, ["b"] * 4, max_evals=5)
    info = grids.meta["entries"]["ddim|4"]
    assert info["start"] == "trailing" and info["kept"] == "start"
    assert grids.grid("ddim", 4).times(4) == trailing
    failure = "all"
    with pytest.raises(UserError, match="diverged on every start grid"):
        calibrate.calibrate_learned_grids(pipe, GUIDANCE, "ddim", [4], ["a"] * 4, ["b"] * 4, max_evals=5)
