"""DPM-Solver-v3: its statistics file, the reduction to DPM-Solver++, its order, bad input."""

import numpy as np
import pytest
import torch
from conftest import lambda_grid

from sdinfer.denoiser import Denoiser
from sdinfer.eval import gaussian_mixture as gm
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.dpm_solver_v3 import DPMSolverV3
from sdinfer.samplers.ems import EMS


def _run(sched, x_T, sampler, steps):
    den = Denoiser(gm.model_fn(sched), sched, "sample")
    return sample_loop(den, sampler, x_T.clone(), steps, None, None, timesteps=lambda_grid(sched, steps),
                       final="sigma_min")


@pytest.mark.parametrize("steps", [6, 20])
def test_degenerate_first_order_is_ddim(gm_problem, steps):
    sched, x_T, _ = gm_problem
    v3 = DPMSolverV3(degenerated=True, order=1, use_corrector=False)
    a, b = _run(sched, x_T, v3, steps), _run(sched, x_T, get_sampler("ddim"), steps)
    # the integrals are quadratures (relative error ~ 1e-5 at the node spacing), not closed forms
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * float(b.abs().max()))


def test_degenerate_integrals_are_dpm_solver_plus_plus_phi_functions():
    ems = EMS.degenerate(-6.0, 8.0, points=201)
    lam_s, h = -1.3, 1.7
    ints = ems.integrals(lam_s, lam_s + h, [lam_s - 0.9, lam_s - 2.0], orders=3)
    e = np.exp(h)
    exact = {"L": h, "I": e - 1, "C": 0.0, "H1": e * (h - 1) + 1, "H2": e * (h * h / 2 - h + 1) - 1}
    got = {"L": ints.L_t, "I": ints.I_t, "C": ints.C_t, "H1": ints.H[0], "H2": ints.H[1]}
    for key, value in exact.items():
        assert abs(float(got[key].flatten()[0]) - value) <= 5e-5 * max(1.0, abs(value)), key
    assert [float(S.flatten()[0]) for S in ints.S_at] == [0.0, 0.0]


def test_degenerate_v3_converges_at_its_order(gm_problem):
    sched, x_T, ref = gm_problem
    steps = [24, 36, 48, 72]
    for order, low, high in ((2, 1.7, 2.4), (3, 2.6, 3.4)):
        errors = [float((_run(sched, x_T, DPMSolverV3(degenerated=True, order=order, use_corrector=False,
                                                      lower_order_final=False), n) - ref).square().mean().sqrt())
                  for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert low < slope < high, (order, slope, errors)


def test_the_corrector_lowers_the_error(gm_problem):
    sched, x_T, ref = gm_problem
    steps = [24, 36, 48, 72]

    def errors(**kw):
        return [float((_run(sched, x_T, DPMSolverV3(degenerated=True, order=2, lower_order_final=False,
                                                    **kw), n) - ref).square().mean().sqrt()) for n in steps]

    plain, corrected = errors(use_corrector=False), errors()
    assert all(c < 0.6 * p for c, p in zip(corrected, plain)), (plain, corrected)
    assert -np.polyfit(np.log(steps), np.log(corrected), 1)[0] > 1.7


def test_the_half_corrector_corrects_only_above_half_time(gm_problem):
    sched, x_T, _ = gm_problem
    corrected_at = {}

    class Counting(DPMSolverV3):
        def step(self, model, x, t, t_next, state):
            before = self._update
            calls = []
            self._update = lambda *a: calls.append(a) or before(*a)
            try:
                return super().step(model, x, t, t_next, state)
            finally:
                del self._update
                # a corrected step updates twice (the corrector, then the predictor; no step here ends at t = 0)
                corrected_at.setdefault(self.use_corrector, []).append((t, len(calls) == 2))

    for mode in ("on", "half", "off"):
        _run(sched, x_T, Counting(degenerated=True, use_corrector=mode), 10)
    times = [t for t, _ in corrected_at["on"]]
    assert [c for _, c in corrected_at["on"]] == [i > 0 for i in range(len(times))]
    assert [c for _, c in corrected_at["half"]] == [i > 0 and t > 0.5 for i, t in enumerate(times)]
    assert not any(c for _, c in corrected_at["off"])
    assert any(c for _, c in corrected_at["half"]) and not all(t > 0.5 for t in times)
    with pytest.raises(ValueError, match="true, false, half"):
        get_sampler("dpm-solver-v3:use_corrector=sometimes")


def test_statistics_round_trip_and_bad_files(tmp_path):
    ems = EMS(torch.linspace(-5, 5, 11), torch.rand(11, 3, 1, 1), torch.rand(11, 3, 1, 1),
              torch.rand(11, 3, 4, 4), {"model": "x", "guidance_scale": 4.0})
    back = EMS.load(ems.save(tmp_path / "ems.safetensors"))
    assert back.meta == ems.meta
    for name in ("lam", "l", "s", "b"):
        torch.testing.assert_close(getattr(back, name), getattr(ems, name), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="sdinfer calibrate"):
        EMS.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="increase"):
        EMS(torch.tensor([0.0, 0.0]), torch.ones(2, 1), torch.ones(2, 1), torch.ones(2, 1))


def test_without_statistics_or_with_the_wrong_shape_it_says_so(gm_problem):
    sched, x_T, _ = gm_problem
    with pytest.raises(ValueError, match="needs the model's statistics"):
        _run(sched, x_T, get_sampler("dpm-solver-v3"), 5)
    wrong = EMS.degenerate(-10, 10, shape=(3, 1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        _run(sched, x_T, DPMSolverV3(stats=wrong), 5)
    with pytest.raises(ValueError, match="orders 1, 2 and 3"):
        get_sampler("dpm-solver-v3:order=4")


def test_calibrated_statistics_beat_dpm_solver_plus_plus_at_low_nfe():
    """The paper's claim on the exact mixture: statistics from 512 trajectories, then NFE 5-10
    on other noise (measured: v3 0.101/0.059/0.036/0.031 against ++ 0.156/0.110/0.092/0.064)."""
    from sdinfer.calibrate import compute_ems

    sched = gm.schedule()
    den = lambda: Denoiser(gm.model_fn(sched), sched, "sample")  # noqa: E731
    x_cal = torch.randn(512, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ems = compute_ems(den(), x_cal, None, None, points=200, generator=torch.Generator().manual_seed(1))
    assert ems.l.shape == (201, 2, 1, 1) and ems.meta["samples"] == 512
    # l is the noise prediction's x-sensitivity: 1 at pure noise, towards 0 at clean data
    assert abs(float(ems.l[0].mean()) - 1) < 1e-3 and float(ems.l[-1].abs().max()) < 0.01
    x_T = torch.randn(256, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = sample_loop(den(), get_sampler("dpm-solver++:order=3"), x_T.clone(), 1000, None, None)
    for n in (5, 6, 8, 10):
        v3 = sample_loop(den(), DPMSolverV3(stats=ems, order=2), x_T.clone(), n, None, None, spacing="logsnr")
        pp = sample_loop(den(), get_sampler("dpm-solver++"), x_T.clone(), n, None, None, spacing="logsnr")
        assert (v3 - ref).square().mean() < 0.7 * (pp - ref).square().mean(), n


def test_the_corrector_follows_the_choice_for_the_nearest_validated_step_count():
    from sdinfer.samplers.dpm_solver_v3 import corrector_setting

    meta = {"use_corrector": "on", "corrector_by_steps": {"5": "off", "6": "on", "10": "half", "20": "on"}}
    assert [corrector_setting(meta, n) for n in (3, 5, 6, 7, 8, 10, 14, 15, 16, 50)] == \
        ["off", "off", "on", "on", "half", "half", "half", "on", "on", "on"]
    # files written before the half corrector say true / false
    assert corrector_setting({"corrector_by_steps": {"5": False, "8": True}}, 7) == "on"
    assert corrector_setting({"use_corrector": False}, 6) == "off"
    assert corrector_setting({}, 6) == "on"
