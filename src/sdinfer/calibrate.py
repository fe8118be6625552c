"""``sdinfer calibrate``: DPM-Solver-v3's empirical model statistics for one model and one
guidance scale (Zheng et al., NeurIPS 2023, Sec. 3.2-3.3 and App. C).

Along ``samples`` probability-flow trajectories (the given prompts and guidance; ``points``
steps of DPM-Solver++(2M) uniform in lambda from t = 1 to the first training step), at every
grid point:

- l = E[tr(d(sigma eps)/dx)] / D, the optimum of E||d(sigma eps - l x)/dx||_F^2 (Eq. 7),
  with Hutchinson's estimate v . J^T v (Rademacher v, one vector-Jacobian product);
- f = (sigma eps - l x) / alpha and its lambda-derivative f' along the trajectory (central
  differences of neighbouring grid points), and s, b by least squares of f' on s f + b
  (Eq. 8): s = Cov(f', f) / Var(f), b = E f' - s E f.

Finite-sample noise makes the estimates rough in lambda, and g inherits the roughness,
which costs the higher-order steps their order; ``smooth`` (default 0.1) convolves l, s, b
along lambda with a Gaussian of that width, which gives it back (measured on the Gaussian
mixture: BENCHMARKS.md, "DPM-Solver-v3 with shipped statistics").

Expectations run over the samples and, with ``reduce="channel"`` (the default), over the
pixels of each channel, which keeps 64 trajectories enough; ``reduce="none"`` keeps one
value per element as the paper does with thousands of samples.

Whether the corrector pays depends on the model, the statistics and the step count (on the
default models each of on, half and off wins somewhere at NFE 5-10), so ``choose_corrector``
samples validation trajectories (other prompts and seeds than the calibration's) at NFE 5-20
with it, without it and with the reference code's "half" corrector (only above t = 0.5),
against the accurate solution of ``samplers/reference.py`` (fourth-order Runge-Kutta in lambda,
checked by step doubling), and writes the mode with the lowest error at
each step count into the file's metadata; the solver follows it (at other step counts, the
nearest one's) unless told ``use_corrector=...``.  Each result is saved as one of the model's
artifacts (``models/artifacts.py``): kinds ``dpm-solver-v3``, ``gits`` and ``learned-grid``.

``calibrate_grid`` records the other per-model sampling aids, GITS's optimal time grid
(``samplers/optimal_grid.py``), from teacher trajectories of the same kind of prompts, and
``calibrate_learned_grids`` one solver's learned grids (``samplers/learned_grid.py``), on noise
seeds of their own (from 2 * 10^5) so that no benchmark's noise is trained on.  Their teachers
are the same accurate reference (``reference_solution``): a teacher must be far more accurate
than the errors it ranks.
"""

from __future__ import annotations

import math

import torch

from .context import StepContext
from .errors import UserError
from .models import artifacts
from .samplers import get_sampler, sample_loop
from .samplers.dpm_solver_v3 import CORRECTOR_MODES, DPMSolverV3
from .samplers.ems import EMS
from .samplers.base import DISCRETE_SPACINGS, ExplicitGrid, continuous_grid
from .samplers.learned_grid import LearnedGrids, learn_grid
from .samplers.optimal_grid import OptimalGrid, compute_grid
from .samplers.reference import START_STEP, solve_reference

REDUCTIONS = ("channel", "all", "none")


def _mean(v: torch.Tensor, reduce: str) -> torch.Tensor:
    """Expectation over samples (dim 0) and, per ``reduce``, pixels; keeps broadcastable dims."""
    dims = {"none": (0,), "channel": (0, *range(2, v.ndim)), "all": tuple(range(v.ndim))}[reduce]
    return v.mean(dim=dims, keepdim=True)[0]


def smooth_along_lambda(values: torch.Tensor, lam: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian kernel smoothing of per-lambda rows (kernel renormalised at the grid's ends)."""
    if width <= 0:
        return values
    d = lam.view(-1, 1) - lam.view(1, -1)
    kernel = torch.exp(-0.5 * (d / width) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    return torch.einsum("ij,j...->i...", kernel.to(values.dtype), values)


def compute_ems(denoiser, x_T: torch.Tensor, cond, uncond, points: int = 250, reduce: str = "channel",
                generator: torch.Generator | None = None, meta: dict | None = None,
                smooth: float = 0.1) -> EMS:
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
    if smooth < 0:
        raise ValueError(f"smoothing width must be >= 0, got {smooth}")
    if points < 10:
        raise ValueError(f"calibration needs at least 10 lambda points, got {points}")
    sched = denoiser.schedule
    lam = torch.linspace(float(sched.lam(1.0)), float(sched.lam(sched.t_min)), points + 1,
                         dtype=torch.float64)
    times = [float(sched.inverse_lambda(v)) for v in lam]
    x = x_T.clone()
    ls, fs = [], []
    prev_x0, prev_h = None, None
    for i, t in enumerate(times):
        ctx = StepContext(step_index=i, num_steps=points + 1, t=t,
                          model_t=float(sched.model_time(t)), generation=0)
        alpha, sigma = float(sched.alpha(t)), float(sched.sigma(t))
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            pred = denoiser(xg, t, cond, uncond, ctx)
            v = torch.randint(0, 2, x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
            (vjp,) = torch.autograd.grad(sigma * pred.eps, xg, v)
        eps, x0 = pred.eps.detach(), pred.x0.detach()
        l = _mean(v * vjp, reduce)
        ls.append(l)
        fs.append((sigma * eps - l * x) / alpha)
        if i == points:
            break
        # DPM-Solver++(2M) step to the next grid point
        lam_s, lam_t = float(lam[i]), float(lam[i + 1])
        h = lam_t - lam_s
        alpha_t, sigma_t = float(sched.alpha(times[i + 1])), float(sched.sigma(times[i + 1]))
        d = x0 if prev_x0 is None else x0 + 0.5 * (h / prev_h) * (x0 - prev_x0)
        x = (sigma_t / sigma) * x - alpha_t * torch.expm1(torch.tensor(-h)).item() * d
        prev_x0, prev_h = x0, h
    f = torch.stack(fs)                                     # (K + 1, B, ...)
    dlam = lam.to(f).view(-1, *([1] * (f.ndim - 1)))
    df = torch.empty_like(f)
    df[1:-1] = (f[2:] - f[:-2]) / (dlam[2:] - dlam[:-2])
    df[0] = (f[1] - f[0]) / (dlam[1] - dlam[0])
    df[-1] = (f[-1] - f[-2]) / (dlam[-1] - dlam[-2])
    s_list, b_list = [], []
    for k in range(points + 1):
        mf, mdf = _mean(f[k], reduce), _mean(df[k], reduce)
        cov = _mean((f[k] - mf) * (df[k] - mdf), reduce)
        var = _mean((f[k] - mf).square(), reduce)
        s = cov / var.clamp(min=1e-12)
        s_list.append(s)
        b_list.append(mdf - s * mf)
    l, s, b = (smooth_along_lambda(torch.stack(v).cpu().to(torch.float64), lam, smooth)
               for v in (ls, s_list, b_list))
    return EMS(lam, l, s, b, {**(meta or {}), "points": points, "samples": int(x_T.shape[0]),
                              "reduce": reduce, "smooth": smooth})


CORRECTOR_NFES = (5, 6, 8, 10, 12, 15, 20)
# The references' and teachers' tolerance (samplers/reference.py) on a model: far below the errors
# ranked on the default models (BENCHMARKS.md), above where their float32 networks stop converging
# (reference.TOLERANCE, the function's own default, is for exact models such as the mixture).
REFERENCE_TOLERANCE = 1e-3
REFERENCE_STEP = START_STEP


def reference_solution(denoiser, x_T: torch.Tensor, cond, uncond,
                       tolerance: float | None = None) -> tuple[torch.Tensor, str]:
    """The accurate end of the probability-flow ODE from ``x_T`` (what calibration measures
    samplers against) and a line saying how it was made."""
    tolerance = REFERENCE_TOLERANCE if tolerance is None else tolerance
    ref = solve_reference(denoiser, x_T, cond, uncond, tolerance=tolerance, step=REFERENCE_STEP)
    return ref.final, (f"RK4 in lambda, {ref.steps} steps (step doubling: {ref.difference:.2g} RMS "
                       f"from {ref.steps // 2} steps, tolerance {tolerance:g})")


def choose_corrector(denoiser, ems: EMS, x_T: torch.Tensor, cond, uncond,
                     nfes: tuple[int, ...] = CORRECTOR_NFES, reference_tolerance: float | None = None) -> dict:
    """Metadata entries: ``corrector_by_steps`` (``on``, ``half`` or ``off`` at each of
    ``nfes``: the mode with the lowest error there), ``use_corrector`` (the best over all of
    them, by the mean log error), ``variant_by_steps`` (``dpm-solver++`` at the step counts
    where DPM-Solver++(2M) beats every mode, which the default solver then runs, else ``v3``)
    and the validation errors they were chosen on: RMS errors over all trajectories against the
    accurate reference (``reference_solution``), the measure the error benchmarks use."""
    with torch.no_grad():
        ref, how = reference_solution(denoiser, x_T, cond, uncond, reference_tolerance)
        errors = {}
        for mode in CORRECTOR_MODES:
            solver = DPMSolverV3(stats=ems, use_corrector=mode)
            errors[mode] = []
            for n in nfes:
                out = sample_loop(denoiser, solver, x_T.clone(), n, cond, uncond)
                errors[mode].append(float((out - ref).double().square().mean().sqrt()))
        plus_plus = [float((sample_loop(denoiser, get_sampler("dpm-solver++"), x_T.clone(), n, cond, uncond)
                            - ref).double().square().mean().sqrt()) for n in nfes]

    def log_mean(values: list[float]) -> float:
        return sum(math.log(max(v, 1e-30)) for v in values) / len(values)

    return {"use_corrector": min(CORRECTOR_MODES, key=lambda m: log_mean(errors[m])),
            "corrector_by_steps": {str(n): min(CORRECTOR_MODES, key=lambda m: errors[m][i])
                                   for i, n in enumerate(nfes)},
            "variant_by_steps": {str(n): "dpm-solver++" if plus_plus[i] < min(e[i] for e in errors.values())
                                 else "v3" for i, n in enumerate(nfes)},
            "corrector_selection": {"nfe": list(nfes), "rms": errors, "dpm-solver++ rms": plus_plus,
                                    "trajectories": int(x_T.shape[0]),
                                    "error": "RMS over all trajectories",
                                    "reference": how}}


def validate_corrector(pipe, ems: EMS, guidance_scale: float, validation_prompts: list[str],
                       seed: int = 0) -> EMS:
    """The corrector settings of ``ems`` chosen on one trajectory per validation prompt (noise
    seeds from seed + 10^5); earlier choices in its metadata are replaced, its tensors kept."""
    v_den, v_x, v_cond, v_uncond = _inputs(pipe, guidance_scale, validation_prompts,
                                           seed + VALIDATION_SEED_OFFSET)
    for key in ("use_corrector", "corrector_by_steps", "variant_by_steps", "corrector_selection"):
        ems.meta.pop(key, None)
    ems.meta.update(choose_corrector(v_den, ems, v_x, v_cond, v_uncond))
    return ems


VALIDATION_SEED_OFFSET = 10**5


def _inputs(pipe, guidance_scale: float, texts: list[str], first_seed: int):
    """The guided denoiser, noise (seeds first_seed, first_seed + 1, ...) and conditioning."""
    cond = pipe.encode(texts)
    use_cfg = guidance_scale != 1.0 and cond is not None
    uncond = pipe.encode([""] * len(texts)) if use_cfg else None
    x_T = pipe.noise([first_seed + i for i in range(len(texts))], pipe.check_size(None))
    return pipe.denoiser(guidance_scale if use_cfg else 1.0), x_T, cond, uncond


def calibrate_pipeline(pipe, guidance_scale: float, prompts: list[str], points: int = 250,
                       reduce: str = "channel", seed: int = 0, smooth: float = 0.1,
                       validation_prompts: list[str] | None = None) -> EMS:
    """The statistics of ``pipe``'s model at ``guidance_scale`` over one trajectory per prompt;
    with ``validation_prompts``, also the corrector setting (noise seeds from seed + 10^5)."""
    if not prompts:
        raise UserError("calibration needs at least one prompt")
    den, x_T, cond, uncond = _inputs(pipe, guidance_scale, prompts, seed)
    meta = {"model": pipe.model.name, "guidance_scale": guidance_scale, "seed": seed}
    try:
        ems = compute_ems(den, x_T, cond, uncond, points, reduce,
                          torch.Generator().manual_seed(seed + 1), meta, smooth)
    except ValueError as err:
        raise UserError(str(err)) from None
    if validation_prompts:
        validate_corrector(pipe, ems, guidance_scale, validation_prompts, seed)
    return ems


def calibrate_grid(pipe, guidance_scale: float, prompts: list[str], points: int = 60,
                   seed: int = 0, tolerance: float | None = None) -> OptimalGrid:
    """GITS's step costs of ``pipe``'s model at ``guidance_scale`` on one teacher trajectory per
    prompt (accurate to ``tolerance``, by default ``REFERENCE_TOLERANCE``)."""
    if not prompts:
        raise UserError("calibration needs at least one prompt")
    den, x_T, cond, uncond = _inputs(pipe, guidance_scale, prompts, seed)
    meta = {"model": pipe.model.name, "guidance_scale": guidance_scale, "seed": seed}
    try:
        return compute_grid(den, x_T, cond, uncond, points,
                            REFERENCE_TOLERANCE if tolerance is None else tolerance, meta)
    except ValueError as err:
        raise UserError(str(err)) from None


LEARNED_SEED_OFFSET = 2 * 10**5
START_SPACINGS = (*DISCRETE_SPACINGS, "logsnr", "karras", "time_uniform", "time_quadratic")


def calibrate_learned_grids(pipe, guidance_scale: float, sampler: str, step_counts: list[int],
                            prompts: list[str], validation_prompts: list[str], seed: int = 0,
                            max_evals: int = 150, teacher_tolerance: float | None = None,
                            grids: LearnedGrids | None = None, on_grid=None) -> LearnedGrids:
    """``sampler``'s learned grid at each of ``step_counts`` for ``pipe``'s model at
    ``guidance_scale``, added to ``grids`` (a new set if None); ``on_grid(steps, info, grids)``
    after each (the CLI saves there, so an interrupted run keeps the grids it has).  The
    teacher is the accurate reference (``reference_solution``, ``teacher_tolerance``)."""
    if not prompts or not validation_prompts:
        raise UserError("learning a grid needs training and validation prompts (--samples, --validation >= 1)")
    if pipe.model.schedule.is_flow:
        raise UserError("learned grids are for VP schedules; a flow-matching model uses the flow grid")
    first = seed + LEARNED_SEED_OFFSET
    train = _inputs(pipe, guidance_scale, prompts, first)
    valid = _inputs(pipe, guidance_scale, validation_prompts, first + VALIDATION_SEED_OFFSET)
    spacings: dict[str, object] = {s: s for s in START_SPACINGS}
    gits = artifacts.find(pipe.model.path, "gits", guidance_scale)
    if gits is not None:
        spacings["gits"] = OptimalGrid.load(gits)
    grids = grids if grids is not None else LearnedGrids()
    with torch.no_grad():
        (teacher_train, how), (teacher_valid, _) = (reference_solution(den, x, c, u, teacher_tolerance)
                                                    for den, x, c, u in (train, valid))
        teachers = [teacher_train, teacher_valid]

        def error(times: list[float], inputs, teacher) -> float:
            den, x, c, u = inputs
            solver = get_sampler(sampler)
            pipe.attach_statistics(solver, guidance_scale)
            try:
                out = sample_loop(den, solver, x.clone(), len(times) - 1, c, u,
                                  spacing=ExplicitGrid(times, "candidate"))
            except FloatingPointError:   # the model's output was not finite on this grid
                return math.inf
            value = float((out - teacher).double().square().mean().sqrt())
            return value if math.isfinite(value) else math.inf

        for steps in step_counts:
            if steps < get_sampler(sampler).min_steps or steps < 1:
                raise UserError(f"sampler {sampler!r} cannot run {steps} steps")
            starts = {name: continuous_grid(train[0], steps, spacing) for name, spacing in spacings.items()
                      if not hasattr(spacing, "max_steps") or steps <= spacing.max_steps}
            try:
                times, info = learn_grid(lambda t: error(t, train, teachers[0]), starts,
                                         lambda t: error(t, valid, teachers[1]), max_evals,
                                         min_time=pipe.model.schedule.t_min)
            except ValueError as err:
                raise UserError(f"{sampler} at {steps} steps: {err}") from None
            info.update(samples=len(prompts), validation=len(validation_prompts), seed=seed,
                        teacher=how)
            grids.add(sampler, steps, times, info)
            grids.meta.update({"model": pipe.model.name, "guidance_scale": guidance_scale})
            if on_grid is not None:
                on_grid(steps, info, grids)
    return grids

