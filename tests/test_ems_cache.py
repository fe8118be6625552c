"""DPM-Solver-v3's step integrals own compact storage (no views of the per-node arrays they
were cut from) and the solver's cache of them stays within its byte budget."""

from __future__ import annotations

import torch

from sdinfer.samplers import dpm_solver_v3
from sdinfer.samplers.dpm_solver_v3 import DPMSolverV3
from sdinfer.samplers.ems import EMS


def _ems(shape=(3, 8, 8)):
    lam = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    l, s, b = (1 + 0.1 * torch.rand(121, *shape, generator=g, dtype=torch.float64) for _ in range(3))
    return EMS(lam, l, s, b)


def test_step_integrals_hold_no_views_of_the_full_arrays():
    ems = _ems()
    ints = ems.integrals(-2.0, 1.5, [-3.0, -4.5], orders=3)
    element = 3 * 8 * 8 * 8
    tensors = [ints.L_t, ints.I_t, ints.C_t, *ints.H, *ints.S_at, *ints.B_at, *ints.l_at]
    assert len(tensors) == 13   # L, I, C; H_1, H_2; S, B at 2 points; l at s, t and 2 points
    for t in tensors:
        assert t.shape == (3, 8, 8) and t.untyped_storage().nbytes() == element
    assert ints.nbytes() == len(tensors) * element


def test_the_integral_cache_stays_within_its_budget(monkeypatch):
    ems = _ems()
    budget = 40 * ems.integrals(0.0, 0.1, [-0.1], orders=2).nbytes()
    monkeypatch.setattr(dpm_solver_v3, "INTEGRAL_CACHE_BYTES", budget)
    solver = DPMSolverV3(stats=ems, order=2)
    points = [type("P", (), {"lam": v})() for v in (-0.3, -0.2)]
    for k in range(100):
        a = -5.0 + 0.1 * k
        first = solver._integrals(ems, a, a + 0.05, points[:1])
        assert solver._integrals(ems, a, a + 0.05, points[:1]) is first   # cached
        total = sum(v[0].nbytes() for v in solver._cache.values())
        assert total == solver._cache_bytes <= budget
    assert 0 < len(solver._cache) <= 40
