"""``ModelEvaluator``: what ``search`` asks of a candidate, measured on a model.

- ``quality(candidate, n)``: the candidate's images of the first ``n`` validation prompts against
  the reference run's (PSNR, SSIM) and the prompts (adherence, with the reference's on the same
  prompts).  Images are kept per candidate, so a larger ``n`` generates only the new prompts;
  the reference is generated the same way, prompt range by prompt range.
- ``cost(candidate)``: MACs of one image's generation (``eval.cost.count_macs``), the screening
  cost model, memoised by what changes it (cache, step count, first step).
- ``measure(candidates)``: the finalists and the reference timed together, interleaved
  (``eval.bench.measure_all``) on every validation prompt: wall speed-ups.

Every generation runs with each prompt's own noise seed (``seed + i``) and the candidate's
accelerator installed only around its own runs.
"""

from __future__ import annotations

import time

import torch

from ..eval import bench
from ..eval.adherence import adheres
from ..eval.cost import count_macs
from ..eval.metrics import psnr, ssim
from .budget import Quality
from .space import Candidate

VALIDATION_SEED = 500_000   # noise seeds of the validation prompts (bench's held-out runs use 0+)


class ModelEvaluator:
    def __init__(self, pipe, prompts: list[str], cfg: float, reference: str = "ddim:50",
                 seed: int = VALIDATION_SEED, batch: int = 32, repeats: int = 1, log=lambda m: None):
        self.pipe, self.prompts_list, self.cfg = pipe, list(prompts), cfg
        self.prompts = len(self.prompts_list)
        self.seeds = [seed + i for i in range(self.prompts)]
        self.seed, self.batch, self.repeats, self.log = seed, batch, repeats, log
        self.reference = bench.RunSpec.parse_baseline(reference, cfg)
        self._images: dict[object, list[torch.Tensor]] = {}
        self._seconds: dict[object, list[float]] = {}
        self._adheres: dict[object, list[bool | None]] = {}
        self._macs: dict[tuple, int] = {}
        self.reference_cost = float(self._count(self.reference))

    # ---- images -----------------------------------------------------------------
    def _generate(self, key, spec: bench.RunSpec, n: int) -> None:
        """Extend ``key``'s images to the first ``n`` prompts."""
        have = self._images.setdefault(key, [])
        seconds = self._seconds.setdefault(key, [])
        ok = self._adheres.setdefault(key, [])
        while len(have) < n:
            a = len(have)
            b = min(n, a + self.batch)
            with bench._installed(self.pipe, spec):
                start = time.perf_counter()
                out = self.pipe(self.prompts_list[a:b], steps=spec.steps, sampler=spec.sampler,
                                guidance_scale=spec.cfg, seeds=self.seeds[a:b], spacing=spec.spacing,
                                analytic_first_step=spec.analytic_first_step)
                elapsed = time.perf_counter() - start
            have.extend(out.pixels)
            seconds.extend([elapsed / (b - a)] * (b - a))
            ok.extend(adheres((p.permute(1, 2, 0).numpy() * 255).round(), c)
                      for p, c in zip(out.pixels, self.prompts_list[a:b]))

    def quality(self, candidate: Candidate, n: int) -> Quality:
        n = min(n, self.prompts)
        self._generate("reference", self.reference, n)
        self._generate(candidate, candidate.run_spec(self.cfg), n)
        images = torch.stack(self._images[candidate][:n])
        reference = torch.stack(self._images["reference"][:n])
        mine, ref = self._adheres[candidate][:n], self._adheres["reference"][:n]
        return Quality(psnr=psnr(images, reference), ssim=ssim(images, reference), adherence=_rate(mine),
                       reference_adherence=_rate(ref), prompts=n,
                       discordant=sum(a != b for a, b in zip(mine, ref) if a is not None and b is not None))

    def screening_speedup(self, candidate: Candidate) -> float | None:
        """The reference's seconds per image over the candidate's, on the prompts both generated
        (in the same prompt ranges; not interleaved, so rougher than ``measure``)."""
        mine = self._seconds.get(candidate, [])
        ref = self._seconds.get("reference", [])[:len(mine)]
        if not mine or len(ref) < len(mine):
            return None
        return sum(ref) / sum(mine)

    # ---- cost ----------------------------------------------------------------------
    def _count(self, spec: bench.RunSpec) -> int:
        # a step-by-step sampler's MACs do not depend on which sampler or grid: the model's calls do
        # (a data-dependent cache's skips move a little with the grid; the finalists' timing settles it)
        key = (spec.steps, spec.analytic_first_step, spec.accelerate)
        if key not in self._macs:
            with bench._installed(self.pipe, spec):
                self._macs[key] = count_macs(lambda: self.pipe(
                    self.prompts_list[:1], steps=spec.steps, sampler=spec.sampler, guidance_scale=spec.cfg,
                    seeds=self.seeds[:1], spacing=spec.spacing, analytic_first_step=spec.analytic_first_step))
        return self._macs[key]

    def cost(self, candidate: Candidate) -> float:
        return float(self._count(candidate.run_spec(self.cfg)))

    # ---- timing ----------------------------------------------------------------------
    def measure(self, candidates: list[Candidate]) -> list[dict]:
        specs = [c.run_spec(self.cfg) for c in candidates]
        self.log(f"timing {len(specs)} finalist(s) against {self.reference.label} on {self.prompts} prompts, "
                 f"interleaved, {self.repeats} timed run(s) ...")
        base, *others = bench.measure_all(self.pipe, [self.reference, *specs], self.prompts_list, self.batch,
                                          self.seed, self.repeats, progress=False)
        out = []
        for m in others:
            rec = bench.record(m, base, self.prompts_list, is_baseline=False)
            out.append({k: rec[k] for k in ("speedup_wall", "speedup_macs", "wall_s", "nfe", "macs",
                                            "psnr", "ssim", "adherence")}
                       | {"reference_wall_s": round(base.wall_s, 4)})
        return out


def _rate(values: list) -> float | None:
    checked = [v for v in values if v is not None]
    return sum(checked) / len(checked) if checked else None
