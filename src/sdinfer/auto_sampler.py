"""``sampler="auto"``: per step budget (NFE), the sampler configuration that validation chose.

Candidates are (sampler, time grid, analytic first step) triples over the library's own
samplers and calibrated aids (DPM-Solver-v3's statistics and its corrector modes, GITS's grid,
learned grids).  Each runs at every NFE from validation noise (other seeds than any
calibration's) and is scored per trajectory against an accurate solution of the same ODE.

The score is robust to a few trajectories that end in another mixture component (or, on an
image model, another image): one such trajectory moves an RMS over all trajectories by more
than the configurations differ, so a choice on the RMS follows which configuration flipped
which trajectory.  ``robust_score`` is the root of the trimmed mean of per-trajectory mean
squared errors (the largest ``trim`` share dropped, at least one trajectory when there are
20 or more); ``choose`` picks the lowest per NFE and reports its own spread: a bootstrap over
the validation trajectories (the chosen candidate's score interval, and how often the same
candidate wins on a resample).

The choice is a table per guidance scale, kept beside the model as the ``auto-sampler``
artifact (``models/artifacts.py``); ``sdinfer calibrate auto`` (``calibrate_auto``) makes it,
calibrating first whatever aid a candidate needs and the model lacks.  ``Pipeline(...,
sampler="auto")`` and ``sdinfer generate --sampler auto`` run, for the steps given (read as
the NFE), what the table says; ``sdinfer.sample(..., sampler="auto", auto=TABLE_OR_FOLDER)``
does the same for any model callable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .models import artifacts

KIND = "sdinfer-auto-sampler"
ARTIFACT = "auto-sampler"
NFES = tuple(range(5, 21))
MAKE = "sdinfer calibrate auto"


@dataclass(frozen=True)
class Candidate:
    """One configuration: a sampler spec (one model evaluation per step), its time grid (a grid
    name, ``gits`` or ``learned``) and whether the first step is the analytic one (then NFE + 1
    steps cost NFE evaluations)."""

    sampler: str
    spacing: str
    analytic_first_step: bool = False

    @property
    def name(self) -> str:
        return f"{self.sampler} [{self.spacing}]" + (" +afs" if self.analytic_first_step else "")

    def steps(self, nfe: int) -> int:
        return nfe + 1 if self.analytic_first_step else nfe

    def needs(self) -> set[str]:
        """The model artifacts this candidate runs on."""
        need = set()
        if self.sampler.startswith("dpm-solver-v3") and "degenerated=true" not in self.sampler:
            need.add("dpm-solver-v3")
        if self.spacing == "gits":
            need.add("gits")
        if self.spacing == "learned":
            need.add("learned-grid")
        return need

    def as_dict(self) -> dict:
        return {"sampler": self.sampler, "spacing": self.spacing,
                "analytic_first_step": self.analytic_first_step}


V3_MODES = ("dpm-solver-v3:use_corrector=true", "dpm-solver-v3:use_corrector=half",
            "dpm-solver-v3:use_corrector=false")
DEFAULT_CANDIDATES = tuple(
    [Candidate(s, g) for s in ("dpm-solver++-2m", "dpm-solver++-3m", "unipc:order=2", "unipc:order=3")
     for g in ("trailing", "logsnr", "gits")]
    + [Candidate(s, g) for s in V3_MODES for g in ("trailing", "logsnr", "gits")]
    + [Candidate("dpm-solver-v3:use_corrector=half", "gits", True),
       Candidate("dpm-solver++-2m", "gits", True)]
    # on their learned grids, where the model has them (``sdinfer calibrate learned-grid``)
    + [Candidate(s, "learned") for s in ("unipc:order=3", "dpm-solver-v3:use_corrector=true")])


# ---- the robust choice ---------------------------------------------------------------------
def per_sample_mse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each trajectory's end."""
    return (out.double() - ref.double()).reshape(out.shape[0], -1).square().mean(1)


def trimmed_count(n: int, trim: float) -> int:
    """How many of n trajectories the trimmed score drops: the ``trim`` share, rounded up, and at
    least one from 20 trajectories on."""
    drop = math.ceil(trim * n)
    return min(max(drop, 1 if n >= 20 else 0), n - 1)


def robust_score(mse: torch.Tensor, trim: float = 0.05) -> float:
    """sqrt of the mean of the per-trajectory MSEs without the largest ``trimmed_count``."""
    values = torch.as_tensor(mse, dtype=torch.float64).reshape(-1)
    values = torch.nan_to_num(values, nan=float("inf"), posinf=float("inf"))
    kept = torch.sort(values).values[:values.numel() - trimmed_count(values.numel(), trim)]
    return float(kept.mean().sqrt())


def rms(mse: torch.Tensor) -> float:
    return float(torch.as_tensor(mse, dtype=torch.float64).mean().sqrt())


def choose(errors: dict[str, dict[int, torch.Tensor]], trim: float = 0.05, resamples: int = 200,
           seed: int = 0) -> dict[int, dict]:
    """Per NFE, the candidate (key of ``errors``) with the lowest ``robust_score`` of its
    per-trajectory MSEs (``errors[name][nfe]``, (B,), the same trajectories for all), with its
    score, the runner-up's, the RMS over all trajectories, a 90% bootstrap interval of its score
    and ``stability``: the share of bootstrap resamples on which it is still the choice."""
    nfes = sorted({n for per in errors.values() for n in per})
    g = torch.Generator().manual_seed(seed)
    table = {}
    for nfe in nfes:
        names = [k for k in errors if nfe in errors[k]]
        scores = {k: robust_score(errors[k][nfe], trim) for k in names}
        ranked = sorted(names, key=lambda k: scores[k])
        best = ranked[0]
        if not math.isfinite(scores[best]):
            continue   # no candidate ran at this NFE: the table leaves it out
        n = errors[best][nfe].numel()
        stack = torch.stack([torch.nan_to_num(errors[k][nfe].double(), nan=float("inf"), posinf=float("inf")) for k in names])
        wins, boot = 0, []
        for _ in range(resamples):
            idx = torch.randint(0, n, (n,), generator=g)
            resampled = [robust_score(stack[i, idx], trim) for i in range(len(names))]
            boot.append(resampled[names.index(best)])
            wins += int(min(range(len(names)), key=lambda i: resampled[i]) == names.index(best))
        boot_t = torch.tensor(boot, dtype=torch.float64)
        table[nfe] = {"choice": best, "score": scores[best],
                      "runner_up": ranked[1] if len(ranked) > 1 else None,
                      "runner_up_score": scores[ranked[1]] if len(ranked) > 1 else None,
                      "rms": rms(errors[best][nfe]),
                      "interval": [float(boot_t.quantile(0.05)), float(boot_t.quantile(0.95))],
                      "stability": wins / max(resamples, 1), "trajectories": int(n)}
    return table


# ---- the table, a model artifact -----------------------------------------------------------
@dataclass(eq=False)
class AutoTable:
    """What validation chose per NFE at one guidance scale: ``entries[nfe]`` holds the
    candidate (``sampler``, ``spacing``, ``analytic_first_step``) and the scores of ``choose``.
    ``aids``: calibrated objects the candidates run on when the table is used without a model
    folder (``"dpm-solver-v3"``: an EMS, ``"gits"``: an OptimalGrid, ``"learned-grid"``:
    LearnedGrids); not saved."""

    guidance_scale: float
    entries: dict[int, dict]
    meta: dict = field(default_factory=dict)
    aids: dict = field(default_factory=dict)

    @classmethod
    def from_choice(cls, guidance_scale: float, choice: dict[int, dict], candidates: dict[str, Candidate],
                    meta: dict | None = None, aids: dict | None = None) -> "AutoTable":
        entries = {int(n): {**candidates[c["choice"]].as_dict(), **c} for n, c in choice.items()}
        return cls(guidance_scale, entries, dict(meta or {}), dict(aids or {}))

    def candidate(self, nfe: int) -> Candidate:
        if nfe not in self.entries:
            have = ", ".join(map(str, sorted(self.entries)))
            raise UserError(f"the auto-sampler table at cfg {self.guidance_scale:g} covers NFE {have}, not "
                            f"{nfe}; choose one of those step counts or extend it with `{MAKE} --nfes ...`")
        e = self.entries[nfe]
        return Candidate(e["sampler"], e["spacing"], bool(e["analytic_first_step"]))

    def save(self, path: str | Path) -> Path:
        nfes = sorted(self.entries)
        scores = torch.tensor([self.entries[n]["score"] for n in nfes], dtype=torch.float64)
        return artifacts.write(path, {"nfe": torch.tensor(nfes, dtype=torch.int64), "score": scores},
                               {"kind": KIND, "guidance_scale": self.guidance_scale,
                                "entries": {str(n): self.entries[n] for n in nfes}, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> "AutoTable":
        tensors, meta = artifacts.read(path, "auto-sampler table", MAKE,
                                       json_keys=("guidance_scale", "entries", "meta"))
        if meta.get("kind") != KIND or "entries" not in meta:
            raise UserError(f"{path} is not an auto-sampler table (made by `{MAKE}`)")
        entries = {int(n): e for n, e in meta["entries"].items()}
        return cls(float(meta["guidance_scale"]), entries, meta.get("meta", {}))


def table_for(folder, guidance_scale: float, model_name: str = "MODEL") -> AutoTable:
    """The model's auto-sampler table at ``guidance_scale``, or one error naming the command."""
    path = artifacts.find(folder, ARTIFACT, guidance_scale) if folder is not None else None
    if path is None:
        where = artifacts.path(folder, ARTIFACT, guidance_scale) if folder is not None else "(no model folder)"
        raise UserError(f"sampler 'auto' needs model {model_name}'s auto-sampler table at cfg {guidance_scale:g}, "
                        f"and {where} does not exist; make it with `{MAKE} --model {model_name} "
                        f"--cfg {guidance_scale:g}` or choose a sampler by name (e.g. dpm-solver++)")
    return AutoTable.load(path)


def resolve(table: AutoTable, nfe: int, folder=None):
    """(sampler object, grid (name or object), analytic first step, steps) for ``nfe``: the
    table's candidate with its aids from ``table.aids`` or the model folder's artifacts."""
    from .samplers import get_sampler
    from .samplers.dpm_solver_v3 import DPMSolverV3

    cand = table.candidate(nfe)
    solver = get_sampler(cand.sampler)
    steps = cand.steps(nfe)

    def aid(kind: str):
        if kind in table.aids:
            return table.aids[kind]
        path = artifacts.find(folder, kind, table.guidance_scale)
        if path is None:
            raise UserError(f"the auto-sampler table chose {cand.name} at NFE {nfe}, which needs the model's "
                            f"{kind} artifact at cfg {table.guidance_scale:g}, and there is none; run `{MAKE}` "
                            "again (it calibrates what its candidates need)")
        return resolve_aid(kind, path)

    if isinstance(solver, DPMSolverV3) and "dpm-solver-v3" in cand.needs():
        solver.stats = aid("dpm-solver-v3")
    spacing: object = cand.spacing
    if cand.spacing == "gits":
        spacing = aid("gits")
    elif cand.spacing == "learned":
        spacing = aid("learned-grid").grid(cand.sampler, steps)
    return solver, spacing, cand.analytic_first_step, steps


# ---- evaluation of candidates --------------------------------------------------------------
@torch.no_grad()
def evaluate(denoiser, candidates: list[Candidate], x_T: torch.Tensor, cond, uncond, reference: torch.Tensor,
             nfes=NFES, aids: dict | None = None, on_row=None) -> dict[str, dict[int, torch.Tensor]]:
    """Per candidate and NFE, the per-trajectory MSE of its end against ``reference`` (inf where
    it fails or lacks an aid: a grid with fewer steps, a learned grid not made)."""
    from .samplers import sample_loop

    table = AutoTable(denoiser.guidance_scale if hasattr(denoiser, "guidance_scale") else 1.0, {},
                      aids=dict(aids or {}))
    out: dict[str, dict[int, torch.Tensor]] = {}
    for cand in candidates:
        out[cand.name] = {}
        for nfe in nfes:
            table.entries[nfe] = {**cand.as_dict()}
            try:
                solver, spacing, afs, steps = resolve(table, nfe)
                end = sample_loop(denoiser, solver, x_T.clone(), steps, cond, uncond, spacing=spacing,
                                  analytic_first_step=afs)
                mse = per_sample_mse(end, reference)
            except (KeyError, ValueError, UserError, FloatingPointError):
                mse = torch.full((x_T.shape[0],), float("inf"), dtype=torch.float64)
            out[cand.name][nfe] = torch.nan_to_num(mse, nan=float("inf"), posinf=float("inf"))
        if on_row is not None:
            on_row(cand, out[cand.name])
    return out


@torch.no_grad()
def accurate_reference(denoiser, x_T: torch.Tensor, cond, uncond, steps: int = 400) -> tuple[torch.Tensor, float]:
    """A high-order solution of the model's ODE (DPM-Solver++(3M), ``steps`` steps uniform in
    log-SNR) and its distance (RMS) to the same at half the steps: the check of its accuracy."""
    from .samplers import get_sampler, sample_loop

    fine = sample_loop(denoiser, get_sampler("dpm-solver++-3m"), x_T.clone(), steps, cond, uncond,
                       spacing="logsnr")
    coarse = sample_loop(denoiser, get_sampler("dpm-solver++-3m"), x_T.clone(), steps // 2, cond, uncond,
                         spacing="logsnr")
    return fine, float((fine - coarse).double().square().mean().sqrt())


AUTO_SEED_OFFSET = 3 * 10**5


def calibrate_auto(pipe, guidance_scale: float, prompts: list[str], validation_prompts: list[str],
                   seed: int = 0, nfes=NFES, candidates=DEFAULT_CANDIDATES, trim: float = 0.05,
                   reference_steps: int = 400, log=print) -> AutoTable:
    """The auto-sampler table of ``pipe``'s model at ``guidance_scale``: DPM-Solver-v3's
    statistics and GITS's grid calibrated on ``prompts`` where the model has none (saved beside
    it), then every candidate scored on one trajectory per validation prompt (noise seeds from
    seed + 3 * 10^5) against ``accurate_reference``."""
    from .calibrate import _inputs, calibrate_grid, calibrate_pipeline

    if not prompts or not validation_prompts:
        raise UserError("the auto sampler needs calibration and validation prompts (--samples, --validation >= 1)")
    if pipe.model.schedule.is_flow:
        raise UserError("sampler 'auto' chooses among VP-schedule samplers and grids; a flow-matching model "
                        "has none of its candidates' aids")
    folder = pipe.model.path
    needed = set().union(*(c.needs() for c in candidates))
    aids = {}
    if "dpm-solver-v3" in needed:
        found = artifacts.find(folder, "dpm-solver-v3", guidance_scale)
        if found is None:
            log(f"calibrating DPM-Solver-v3's statistics at cfg {guidance_scale:g} on {len(prompts)} trajectories")
            ems = calibrate_pipeline(pipe, guidance_scale, prompts, seed=seed, validation_prompts=validation_prompts)
            ems.save(artifacts.writable_path(folder, "dpm-solver-v3", guidance_scale))
    if "gits" in needed and artifacts.find(folder, "gits", guidance_scale) is None:
        log(f"calibrating the GITS grid at cfg {guidance_scale:g} on {len(prompts)} trajectories")
        calibrate_grid(pipe, guidance_scale, prompts, seed=seed).save(
            artifacts.writable_path(folder, "gits", guidance_scale))
    if "learned-grid" in needed and artifacts.find(folder, "learned-grid", guidance_scale) is None:
        candidates = [c for c in candidates if "learned-grid" not in c.needs()]
        log("no learned grids beside the model: their candidates are left out "
            "(`sdinfer calibrate learned-grid` makes them)")
    den, x_T, cond, uncond = _inputs(pipe, guidance_scale, validation_prompts, seed + AUTO_SEED_OFFSET)
    reference, ref_check = accurate_reference(den, x_T, cond, uncond, reference_steps)
    log(f"reference: DPM-Solver++(3M) {reference_steps} log-SNR steps, {ref_check:.2e} RMS from half as many")

    table = AutoTable(guidance_scale, {})
    for kind in ("dpm-solver-v3", "gits", "learned-grid"):
        path = artifacts.find(folder, kind, guidance_scale)
        if path is not None:
            aids[kind] = resolve_aid(kind, path)
    table.aids = aids
    errors = evaluate(den, list(candidates), x_T, cond, uncond, reference, nfes, aids,
                      on_row=lambda c, e: log(f"  {c.name}: " + ", ".join(
                          f"{n} {robust_score(v, trim):.4f}" for n, v in e.items())))
    choice = choose(errors, trim)
    meta = {"model": pipe.model.name, "guidance_scale": guidance_scale, "seed": seed,
            "validation": len(validation_prompts), "trim": trim,
            "reference": f"dpm-solver++-3m {reference_steps} logsnr steps", "reference_check_rms": ref_check,
            "candidates": [c.name for c in candidates],
            "score": "sqrt of the trimmed mean of per-trajectory MSE"}
    return AutoTable.from_choice(guidance_scale, choice, {c.name: c for c in candidates}, meta)


def resolve_aid(kind: str, path):
    from .samplers.ems import EMS
    from .samplers.learned_grid import LearnedGrids
    from .samplers.optimal_grid import OptimalGrid
    return {"dpm-solver-v3": EMS.load, "gits": OptimalGrid.load, "learned-grid": LearnedGrids.load}[kind](path)
