"""StepSaver: the fewest denoising steps per prompt, and a predictor of them (Yu et al.,
"StepSaver: Predicting Minimum Denoising Steps for Diffusion Model Image Generation",
arXiv:2408.02054, 2024).

The paper labels each prompt with the smallest step count whose image is as good as a
full run's and trains a language model to predict that label from the prompt.  Here:

- ``find_min_steps``: for every prompt, the smallest candidate step count whose image,
  from the same seed, is within ``threshold_db`` PSNR of the reference run's image
  (the candidates are tried from few steps up; none passing gives the reference count);
- ``StepPredictor``: ridge regression from the model's own text features (the mean of
  the text encoder's token states, with the pooled state where there is one) to the
  label's rank among the candidates, rounded up so that a miss errs toward more steps;
  saved as safetensors with its candidates in the header, and found beside a model as its
  ``stepsaver`` artifact (``MODEL/sdinfer_calibration/stepsaver.safetensors``, see
  ``models/artifacts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .eval.metrics import psnr
from .models import artifacts

KIND = "stepsaver"
MAKE = "sdinfer bench --min-steps ... --save-predictor PATH"
CANDIDATES = (5, 6, 8, 10, 12, 15, 20, 25, 30, 40)


@dataclass
class MinSteps:
    prompts: list[str]
    steps: list[int]          # per prompt: the fewest steps within the threshold
    psnr_db: list[float]      # per prompt: PSNR of that run against the reference
    reference_steps: int
    threshold_db: float

    @property
    def mean_steps(self) -> float:
        return sum(self.steps) / len(self.steps)

    def as_dict(self) -> dict:
        return {"reference_steps": self.reference_steps, "threshold_db": self.threshold_db,
                "mean_steps": self.mean_steps,
                "prompts": [{"prompt": p, "steps": s, "psnr_db": round(q, 2)}
                            for p, s, q in zip(self.prompts, self.steps, self.psnr_db)]}


def _per_image_psnr(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    return [psnr(a[None], b[None]) for a, b in zip(images, reference)]


def _generate(pipe, prompts, seeds, steps, sampler, guidance_scale, batch) -> torch.Tensor:
    out = []
    for k in range(0, len(prompts), batch):
        out.append(pipe(prompts[k:k + batch], steps=steps, sampler=sampler,
                        guidance_scale=guidance_scale, seeds=seeds[k:k + batch]).pixels)
    return torch.cat(out)


def find_min_steps(pipe, prompts: list[str], sampler: str = "ddim", reference_steps: int = 50,
                   candidates=CANDIDATES, threshold_db: float = 30.0, guidance_scale: float = 4.0,
                   seed: int = 0, batch: int = 50) -> MinSteps:
    """Label each prompt with its fewest steps (prompt i uses seed ``seed + i``)."""
    if not prompts:
        raise UserError("no prompts to label; give a prompt set")
    candidates = sorted({int(c) for c in candidates if 0 < int(c) < reference_steps})
    if not candidates:
        raise UserError(f"no candidate step count below the reference's {reference_steps}; "
                        "give --steps smaller than the baseline's")
    prompts = list(prompts)
    seeds = [seed + i for i in range(len(prompts))]
    reference = _generate(pipe, prompts, seeds, reference_steps, sampler, guidance_scale, batch)
    steps = [reference_steps] * len(prompts)
    quality = [100.0] * len(prompts)
    for c in candidates:
        open_ = [i for i, s in enumerate(steps) if s == reference_steps]
        if not open_:
            break
        images = _generate(pipe, [prompts[i] for i in open_], [seeds[i] for i in open_], c,
                           sampler, guidance_scale, batch)
        for i, q in zip(open_, _per_image_psnr(images, reference[open_])):
            if q >= threshold_db:
                steps[i], quality[i] = c, q
    return MinSteps(prompts, steps, quality, reference_steps, threshold_db)


def prompt_features(pipe, prompts: list[str]) -> torch.Tensor:
    """Mean token state of the model's text encoder, with the pooled state where present."""
    text = pipe.encode(list(prompts))
    if text is None:
        raise UserError(f"model {pipe.model.name} has no text encoder, so StepSaver has no "
                        "prompt features to predict from")
    parts = [text.states.float().mean(1)]
    if text.pooled is not None:
        parts.append(text.pooled.float().reshape(len(prompts), -1))
    return torch.cat(parts, dim=1).cpu()   # the predictor lives on the CPU


class StepPredictor:
    """Ridge regression from prompt features to the rank of the fewest steps."""

    def __init__(self, levels: list[int], weight: torch.Tensor, mean: torch.Tensor,
                 scale: torch.Tensor):
        self.levels, self.weight, self.mean, self.scale = list(levels), weight, mean, scale

    @classmethod
    def fit(cls, features: torch.Tensor, steps: list[int], levels: list[int],
            ridge: float = 1.0) -> "StepPredictor":
        levels = sorted(set(levels) | set(steps))
        y = torch.tensor([levels.index(s) for s in steps], dtype=torch.float64)
        x = features.double()
        mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
        z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        reg = ridge * torch.eye(z.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0  # no penalty on the intercept
        weight = torch.linalg.solve(z.T @ z + reg, z.T @ y)
        return cls(levels, weight, mean, scale)

    def predict(self, features: torch.Tensor) -> list[int]:
        z = (features.double() - self.mean) / self.scale
        rank = z @ self.weight[:-1] + self.weight[-1]
        idx = torch.ceil(rank - 1e-6).clamp(0, len(self.levels) - 1).long()
        return [self.levels[int(i)] for i in idx]

    def save(self, path: Path) -> None:
        artifacts.write(path, {"weight": self.weight, "mean": self.mean, "scale": self.scale},
                        {"kind": "sdinfer-stepsaver", "levels": self.levels})

    @classmethod
    def load(cls, path: Path) -> "StepPredictor":
        tensors, meta = artifacts.read(path, "step predictor", MAKE, json_keys=("levels",))
        if (meta.get("kind") != "sdinfer-stepsaver" or not isinstance(meta.get("levels"), list)
                or not {"weight", "mean", "scale"} <= tensors.keys()):
            raise UserError(f"{path} is not an sdinfer step predictor; make one with {MAKE}")
        return cls(meta["levels"], tensors["weight"], tensors["mean"], tensors["scale"])


def predictor_for(pipe, path: str | Path | None = None) -> StepPredictor:
    """The predictor at ``path``, or the one saved beside the model."""
    if path is not None:
        return StepPredictor.load(path)
    beside = artifacts.find(pipe.model.path, KIND)
    if beside is None:
        raise UserError(f"--steps auto needs a step predictor and model {pipe.model.name} has none "
                        f"({artifacts.path(pipe.model.path, KIND)}); pass --predictor PATH, made with "
                        "sdinfer bench --min-steps")
    return StepPredictor.load(beside)
