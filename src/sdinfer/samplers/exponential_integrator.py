"""The exponential-integrator updates that DPM-Solver's variants share.

``exponential_update``: one step from s to t given the model output at s and its
divided differences (Lu et al. 2022, DPM-Solver Eq. 3.7 and DPM-Solver++ Eq. 8,
with the SDE form of DPM-Solver++ sec. 5).  ``block_update``: a singlestep update
from s through intermediate evaluations (DPM-Solver Algorithms 1 and 2).
``singlestep_update``: DPM-Solver-2 / -3 from s to t with the paper's
intermediate times (r = 1/2; r = 1/3, 2/3), evaluating the model on the way.
"""

from __future__ import annotations

import math

import torch

INTERMEDIATE_FRACTIONS = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def exponential_update(sched, x, s, t, h, m0, d1=None, d2=None, data=True, midpoint=True,
                       noise=None):
    """One DPM-Solver update from time s to t (h = lambda_t - lambda_s) with the model
    output m0 at s and its scaled divided differences d1 (~ h m') and d2 (~ h^2 m'').

    data / noise prediction: the ODE forms of DPM-Solver++ / DPM-Solver; ``midpoint``
    weighs d1 by phi/2 (the midpoint rule) instead of the exact (phi/h + 1).  With
    ``noise`` (data prediction only) it is the SDE-DPM-Solver++ step (Lu et al. 2022,
    sec. 5): the exponential weights of the integral  2 alpha_t int e^{-2(lambda_t - u)} x0(u) du
    are those of the ODE with h -> 2h, and sigma_t sqrt(1 - e^{-2h}) z is added.  Its
    second-order term integrates to alpha_t (1/2 - (phi + 2h) / (2h)^2) d2 with
    phi = e^{-2h} - 1; diffusers' sde-dpmsolver++ 3M writes -1/2 there."""
    a_t, s_t = float(sched.alpha(t)), float(sched.sigma(t))
    a_s, s_s = float(sched.alpha(s)), float(sched.sigma(s))
    if noise is not None:
        if not data:
            raise ValueError("the SDE step is written for the data prediction (dpmsolver++)")
        phi, hh = math.expm1(-2.0 * h), 2.0 * h
        x_next = (s_t / s_s) * math.exp(-h) * x - a_t * phi * m0 + s_t * math.sqrt(-phi) * noise
    elif data:
        phi, hh = math.expm1(-h), h
        x_next = (s_t / s_s) * x - a_t * phi * m0
    else:
        phi, hh = math.expm1(h), h
        x_next = (a_t / a_s) * x - s_t * phi * m0
    if d1 is None:
        return x_next
    if data:
        x_next = x_next + (-0.5 * a_t * phi if midpoint else a_t * (phi / hh + 1.0)) * d1
        if d2 is not None:
            x_next = x_next - a_t * ((phi + hh) / hh**2 - 0.5) * d2
    else:
        x_next = x_next - (0.5 * s_t * phi if midpoint else s_t * (phi / h - 1.0)) * d1
        if d2 is not None:
            x_next = x_next - s_t * ((phi - h) / h**2 - 0.5) * d2
    return x_next


def block_update(sched, x_s, s, lam_s, outputs, t, data, solver_type, noise=None):
    """Update from the block start s to t with the outputs (lambda, m) at s, u_1[, u_2]."""
    h = float(sched.lam(t)) - lam_s
    m0 = outputs[0][1]
    d1 = d2 = None
    if len(outputs) == 2:
        (lam_u, m_u) = outputs[1]
        d1 = (m_u - m0) / ((lam_u - lam_s) / h)
    elif len(outputs) == 3:
        (lam_1, m_1), (lam_2, m_2) = outputs[1], outputs[2]
        r1, r2 = (lam_1 - lam_s) / h, (lam_2 - lam_s) / h
        d1_1, d1_2 = (m_1 - m0) / r1, (m_2 - m0) / r2
        if solver_type == "midpoint":
            d1 = d1_2
            return exponential_update(sched, x_s, s, t, h, m0, d1, None, data, midpoint=False,
                                      noise=noise)
        d1 = (r2 * d1_1 - r1 * d1_2) / (r2 - r1)
        d2 = 2.0 * (d1_2 - d1_1) / (r2 - r1)
    return exponential_update(sched, x_s, s, t, h, m0, d1, d2, data,
                              midpoint=solver_type == "midpoint", noise=noise)


def singlestep_update(evaluate, sched, x_s, s, t, m_s, order: int, data: bool):
    """DPM-Solver-``order`` from s to t (Alg. 1 / 2): ``evaluate(x, u)`` gives the model
    output at the intermediate times.  Returns the update and the outputs (lambda, m)."""
    lam_s = float(sched.lam(s))
    h = float(sched.lam(t)) - lam_s
    outputs = [(lam_s, m_s)]
    for r in INTERMEDIATE_FRACTIONS[order]:
        u = float(sched.inverse_lambda(torch.tensor(lam_s + r * h, dtype=torch.float64)))
        x_u = block_update(sched, x_s, s, lam_s, list(outputs), u, data, "heun")
        outputs.append((lam_s + r * h, evaluate(x_u, u)))
    return block_update(sched, x_s, s, lam_s, outputs, t, data, "midpoint"), outputs
