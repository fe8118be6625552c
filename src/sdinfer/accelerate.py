"""``sdinfer.accelerate``: one entry point that installs accelerators on sdinfer's pipeline, a
stock diffusers pipeline or a bare diffusers model.

    handle = sdinfer.accelerate(pipe, "deepcache:interval=3")
    image = pipe(prompt).images[0]
    handle.remove()   # the model is as it was

Specs are strings (``NAME:key=value,...``, several joined by ``+``) or config objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from . import cache
from .errors import UserError


@dataclass(repr=False)
class Accelerated:
    """The accelerators installed by one ``accelerate`` call."""

    model: torch.nn.Module
    handles: list[cache.CacheHandle] = field(default_factory=list)
    configs: list = field(default_factory=list)   # one per handle

    @property
    def methods(self) -> list[str]:
        return [h.method for h in self.handles]

    def __repr__(self) -> str:
        """One line: the specs installed (every setting) and the model's class, not the model."""
        installed = " + ".join(spec_text(c) for c in self.configs) or "nothing installed"
        return f"Accelerated({installed} on {type(self.model).__name__})"

    def reset(self) -> None:
        for h in self.handles:
            h.reset()

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()
        self.configs.clear()


def spec_text(config) -> str:
    """A cache config as the spec that makes it, every setting spelled out: ``fora:interval=3``."""
    settings = ",".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config))
    return f"{cache.method_of(config)}:{settings}" if settings else cache.method_of(config)


def denoiser_of(target) -> tuple[torch.nn.Module, object]:
    """The denoising network of ``target`` and the scheduler that knows its step count."""
    from .pipeline import Pipeline

    if isinstance(target, Pipeline):
        return target.model.denoiser, None
    for attr in ("transformer", "unet"):
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model, getattr(target, "scheduler", None)
    if isinstance(target, torch.nn.Module):
        return target, None
    raise UserError(f"cannot accelerate a {type(target).__name__}: pass an sdinfer Pipeline, a diffusers "
                    "pipeline (with .unet or .transformer) or a diffusers model")


def _specs(spec) -> list:
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("+") if p.strip()]
        if not parts:
            raise UserError("empty accelerator spec; give e.g. deepcache:interval=3")
        return parts
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _specs(s)]
    return [spec]


def guidance_of(target):
    """Whether a diffusers pipeline batches its guidance branches on this call, where it says
    (``do_classifier_free_guidance``; PixArt's pipelines, for one, do not)."""
    if not hasattr(type(target), "do_classifier_free_guidance"):
        return None
    return lambda: bool(target.do_classifier_free_guidance)


def steps_of(scheduler) -> Callable[[], int] | None:
    """A diffusers pipeline's step count of the generation under way, read from its scheduler."""
    if scheduler is None:
        return None

    def num_steps() -> int:
        steps = getattr(scheduler, "timesteps", None)
        return 0 if steps is None else len(steps)
    return num_steps


def accelerate(target, spec) -> Accelerated:
    """Install the accelerators of ``spec`` on ``target``'s denoiser; returns their handle.
    A ``torch.compile``d model is accelerated through the module it wraps."""
    from .parallel import check_cache

    model, scheduler = denoiser_of(target)
    model = getattr(model, "_orig_mod", model)
    num_steps = steps_of(scheduler)
    out = Accelerated(model)
    try:
        for item in _specs(spec):
            config = cache.parse_spec(item) if isinstance(item, str) else item
            check_cache(model, cache.method_of(config))
            out.handles.append(cache.apply(model, config, num_steps, guidance_of(target)))
            out.configs.append(config)
    except (ValueError, TypeError) as err:
        out.remove()
        raise UserError(str(err)) from None
    return out
