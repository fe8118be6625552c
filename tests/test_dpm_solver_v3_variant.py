"""DPM-Solver-v3's default runs what won on validation: where DPM-Solver++(2M) beat every corrector
mode on the validation trajectories (``variant_by_steps``), the default solver takes DPM-Solver++(2M)
steps; explicit settings keep v3."""

from __future__ import annotations

import pytest
import torch

import guided_mixture as gmx
from sdinfer.calibrate import choose_corrector
from sdinfer.samplers import get_sampler, sample_loop
from sdinfer.samplers.dpm_solver_v3 import CORRECTOR_MODES, DPMSolverV3, variant_setting
from sdinfer.samplers.ems import EMS


def _ems(s_value: float, b_value: float, meta=None) -> EMS:
    lam = torch.linspace(-8.0, 8.0, 81, dtype=torch.float64)
    ones = torch.ones(81, 1, 1, 1, dtype=torch.float64)
    return EMS(lam, ones, s_value * ones, b_value * ones, dict(meta or {}))


def test_validation_chooses_dpm_solver_plus_plus_where_it_wins_and_the_default_follows():
    den, x_T, cond, uncond = gmx.problem(7.5, 32, 21)
    nfes = (5, 8, 12)
    for ems in (_ems(1.5, 0.5), EMS.degenerate(-8.0, 8.0, shape=(1, 1, 1))):
        meta = choose_corrector(den, ems, x_T, cond, uncond, nfes=nfes, reference_tolerance=1e-3)
        sel = meta["corrector_selection"]
        for i, n in enumerate(nfes):
            wins = sel["dpm-solver++ rms"][i] < min(sel["rms"][m][i] for m in CORRECTOR_MODES)
            assert meta["variant_by_steps"][str(n)] == ("dpm-solver++" if wins else "v3")
        assert len(sel["dpm-solver++ rms"]) == len(nfes)
        if ems.meta.get("degenerate") is None:   # statistics far from the model's: v3 loses at 5 steps
            assert meta["variant_by_steps"]["5"] == "dpm-solver++"


def test_the_default_runs_the_variant_the_file_chose_and_explicit_settings_keep_v3():
    den, x_T, cond, uncond = gmx.problem(7.5, 16, 22)
    ems = _ems(0.3, 0.1, {"variant_by_steps": {"5": "v3", "8": "dpm-solver++"}, "corrector_by_steps": {"5": "on"}})

    def run(sampler, n):
        return sample_loop(den, sampler, x_T.clone(), n, cond, uncond)

    for n, expected in ((5, "v3"), (6, "v3"), (8, "dpm-solver++"), (10, "dpm-solver++")):
        assert variant_setting(ems.meta, n) == expected
        plus_plus = run(get_sampler("dpm-solver++"), n)
        default = run(DPMSolverV3(stats=ems), n)
        assert torch.equal(default, plus_plus) == (expected == "dpm-solver++"), n
    for explicit in (DPMSolverV3(stats=ems, variant="v3"), DPMSolverV3(stats=ems, use_corrector="on"),
                     DPMSolverV3(stats=ems, order=2)):
        assert not torch.equal(run(explicit, 8), run(get_sampler("dpm-solver++"), 8))
    assert torch.equal(run(DPMSolverV3(stats=ems, variant="dpm-solver++"), 5), run(get_sampler("dpm-solver++"), 5))
    assert variant_setting({}, 8) == "v3"
    with pytest.raises(ValueError, match="unknown variant 'euler'"):
        variant_setting({"variant_by_steps": {"8": "euler"}}, 8)
    with pytest.raises(ValueError, match="variant is one of v3, dpm-solver\\+\\+"):
        get_sampler("dpm-solver-v3:variant=euler")
