"""Calibration data for post-training quantization: what the full-precision model sees along its
own sampling trajectories.

``Calibration`` runs the model's pipeline (sdinfer's, or a stock diffusers one) on training
captions (never the held-out prompts: the default models' are drawn from the training grammar
with ``CALIBRATION_SEED``), seeded, and records through forward hooks what chosen modules take
and return at each step, with the step's model timestep (``StepContext.model_t``; on a stock
pipeline the step tracker of ``cache/base.py`` infers it).  Each capture is one pass over the
trajectories; its wall time and model calls add up in ``cost``, which the methods report.

Rows are subsampled per call (a linear layer's tokens, one image of a batch for a Conv2d or a
block) with a seeded generator, so that memory stays bounded on large models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache.base import CacheHandle
from ..context import current_step
from ..errors import UserError

CALIBRATION_SEED = 31_337    # training captions and noise: not the held-out set's 1234, not validation's


@dataclass
class CalibrationConfig:
    prompts: int = 8          # training captions
    steps: int = 20           # sampler steps per trajectory (DDIM)
    guidance_scale: float = 4.0
    seed: int = CALIBRATION_SEED
    rows: int = 256           # rows kept per linear call (tokens / pixels)

    def __post_init__(self):
        if self.prompts < 1 or self.steps < 1 or self.rows < 1:
            raise UserError("calibration needs at least 1 prompt, 1 step and 1 row per call; "
                            f"got prompts={self.prompts}, steps={self.steps}, rows={self.rows}")


@dataclass
class Captured:
    """One call of a module: its model timestep, and its input (and output, for ``calls``)."""

    model_t: float
    input: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: object = None


@dataclass
class CalibrationCost:
    seconds: float = 0.0
    passes: int = 0
    model_calls: int = 0

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "passes": self.passes, "model_calls": self.model_calls}


def default_prompts(n: int, seed: int = CALIBRATION_SEED) -> list[str]:
    """``n`` captions of the default models' training grammar, none of them held out."""
    from ..eval.prompts import validation_prompts

    return validation_prompts(n, seed)


def detached(item):
    if isinstance(item, torch.Tensor):
        return item.detach().clone()
    if isinstance(item, (tuple, list)):
        return type(item)(detached(i) for i in item)
    if isinstance(item, dict):
        return {k: detached(v) for k, v in item.items()}
    return item


class Calibration:
    """Captures along the full-precision model's trajectories; ``runner()`` runs them once."""

    def __init__(self, model: torch.nn.Module, runner: Callable[[], object], config: CalibrationConfig,
                 prompts: list[str], track_steps: bool = False):
        self.model, self.runner, self.config, self.prompts = model, runner, config, prompts
        self.track_steps = track_steps
        self.cost = CalibrationCost()
        self._calls = 0

    def _run(self) -> None:
        handle = CacheHandle("calibration")
        counter = self.model.register_forward_pre_hook(lambda *_: setattr(self, "_calls", self._calls + 1))
        if self.track_steps:
            handle.track_steps(self.model)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                self.runner()
        finally:
            counter.remove()
            handle.remove()
        self.cost.seconds += time.perf_counter() - start
        self.cost.passes += 1
        self.cost.model_calls += self._calls
        self._calls = 0

    def _capture(self, modules: dict[str, torch.nn.Module], keep: Callable) -> dict[str, list[Captured]]:
        found: dict[str, list[Captured]] = {name: [] for name in modules}
        gen = torch.Generator().manual_seed(self.config.seed)
        hooks = []

        def hook_for(name):
            def hook(module, args, kwargs, output):
                ctx = current_step()
                if ctx is None:
                    raise RuntimeError("calibration ran the model outside a step context")
                found[name].append(keep(float(ctx.model_t), args, kwargs, output, gen))
            return hook

        for name, module in modules.items():
            hooks.append(module.register_forward_hook(hook_for(name), with_kwargs=True))
        try:
            self._run()
        finally:
            for h in hooks:
                h.remove()
        return found

    def inputs(self, modules: dict[str, torch.nn.Module]) -> dict[str, list[Captured]]:
        """Per module, per call: its input (a Linear's last-dim rows, at most ``rows`` of them; one
        sample of a Conv2d's batch)."""
        rows = self.config.rows

        def keep(model_t, args, kwargs, output, gen):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach()
            if x.ndim == 4:   # a Conv2d's input: one sample of the batch
                i = int(torch.randint(x.shape[0], (1,), generator=gen))
                return Captured(model_t, x[i:i + 1].float().clone())
            flat = x.reshape(-1, x.shape[-1])
            if flat.shape[0] > rows:
                flat = flat[torch.randperm(flat.shape[0], generator=gen)[:rows]]
            return Captured(model_t, flat.float().clone())
        return self._capture(modules, keep)

    def calls(self, modules: dict[str, torch.nn.Module]) -> dict[str, list[Captured]]:
        """Per module, per call: its whole arguments and output (for block-wise reconstruction)."""
        def keep(model_t, args, kwargs, output, gen):
            first = args[0] if args else None
            return Captured(model_t, first.detach().clone() if isinstance(first, torch.Tensor) else None,
                            detached(args), detached(kwargs), detached(output))
        return self._capture(modules, keep)

    def timesteps(self) -> list[float]:
        """The model timesteps the trajectories visit, in order (one capture pass)."""
        seen: list[float] = []

        def hook(module, args, kwargs, output):
            ctx = current_step()
            if ctx is not None and (not seen or seen[-1] != float(ctx.model_t)):
                seen.append(float(ctx.model_t))
        h = self.model.register_forward_hook(hook, with_kwargs=True)
        try:
            self._run()
        finally:
            h.remove()
        return sorted(set(seen), reverse=True)


def calibration_for(target, model: torch.nn.Module, config: CalibrationConfig,
                    prompts: list[str] | None = None, pipeline_kwargs: dict | None = None) -> Calibration:
    """The calibration runs of ``target``: sdinfer's ``Pipeline`` (DDIM ``steps``, guidance, seeded
    noise) or a stock diffusers pipeline (its own scheduler, ``output_type="latent"``, and
    ``pipeline_kwargs`` such as ``height`` / ``width`` passed to its calls)."""
    from ..pipeline import Pipeline

    prompts = prompts or default_prompts(config.prompts, config.seed)
    if isinstance(target, Pipeline):
        def run():
            target(prompts, steps=config.steps, sampler="ddim", guidance_scale=config.guidance_scale,
                   seed=config.seed)
        return Calibration(model, run, config, prompts)
    if callable(target) and hasattr(target, "scheduler"):
        def run():
            generator = torch.Generator().manual_seed(config.seed)
            target(prompt=prompts, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                   generator=generator, output_type="latent", **(pipeline_kwargs or {}))
        return Calibration(model, run, config, prompts, track_steps=True)
    raise UserError(f"cannot calibrate on a bare {type(target).__name__}: pass the pipeline (sdinfer's or "
                    "a diffusers one), whose sampling trajectories are the calibration data")
