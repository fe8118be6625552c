"""Presets: the configuration ``sdinfer tune`` chose, as JSON, and ``load_preset`` to run it.

A preset holds what a generation needs (sampler, steps, time grid, analytic first step,
accelerator spec, guidance scale, model) and how it was chosen (budget, reference, the
validation measurements).  ``sdinfer generate --preset FILE`` and ``sdinfer bench --preset
FILE`` run it; ``Preset.generation_kwargs()`` gives ``Pipeline.__call__``'s keywords.
"""

from __future__ import annotations

import datetime
import json
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

KIND = "sdinfer-preset"
VERSION = 1
MAKE = "sdinfer tune --model MODEL --budget SPEC --out DIR"


@dataclass(frozen=True)
class Preset:
    model: str
    sampler: str
    steps: int | str
    guidance_scale: float
    spacing: str | None = None
    analytic_first_step: bool = False
    accelerate: str = ""
    budget: str = ""
    reference: str = "ddim:50"
    validation: dict = field(default_factory=dict)

    def generation_kwargs(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "spacing": self.spacing, "analytic_first_step": self.analytic_first_step}

    def run_spec(self):
        from ..eval.bench import RunSpec

        return RunSpec(sampler=self.sampler, steps=self.steps, cfg=self.guidance_scale, accelerate=self.accelerate,
                       spacing=self.spacing, analytic_first_step=self.analytic_first_step)

    def describe(self) -> str:
        return self.run_spec().label

    def as_dict(self) -> dict:
        from .. import __version__

        return {"kind": KIND, "version": VERSION, **asdict(self),
                "created": datetime.date.today().isoformat(), "sdinfer": __version__}


def save_preset(preset: Preset, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(preset.as_dict(), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


_TYPES = {"model": str, "sampler": str, "guidance_scale": numbers.Real, "analytic_first_step": bool,
          "accelerate": str, "budget": str, "reference": str, "validation": dict}


def load_preset(path) -> Preset:
    """The preset in ``path``, checked: a missing, corrupt or foreign file, or a field of the
    wrong type, is one ``UserError`` naming the file."""
    path = Path(path)
    remake = f"make one with `{MAKE}`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"preset {path} does not exist; {remake}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"preset {path} is not readable JSON ({err}); {remake}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UserError(f"{path} is not an sdinfer preset (no \"kind\": \"{KIND}\"); {remake}")
    if data.get("version") != VERSION:
        raise UserError(f"preset {path} has version {data.get('version')!r}, this sdinfer reads {VERSION}; {remake}")
    for key in ("model", "sampler", "steps", "guidance_scale"):
        if key not in data:
            raise UserError(f"preset {path} has no {key!r}; {remake}")
    for key, kind in _TYPES.items():
        if key in data and (not isinstance(data[key], kind) or (kind is numbers.Real and isinstance(data[key], bool))):
            raise UserError(f"preset {path}: {key} is {data[key]!r}, not a {getattr(kind, '__name__', kind)}; {remake}")
    steps = data["steps"]
    if not (steps == "auto" or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1)):
        raise UserError(f"preset {path}: steps is {steps!r}, not a positive whole number or 'auto'; {remake}")
    spacing = data.get("spacing")
    if spacing is not None and not isinstance(spacing, str):
        raise UserError(f"preset {path}: spacing is {spacing!r}, not a grid name; {remake}")
    fields = {k: data[k] for k in Preset.__dataclass_fields__ if k in data}
    preset = Preset(**fields)
    _check(preset, path)
    return preset


def _check(preset: Preset, path: Path) -> None:
    """The generation options and the accelerator spec parse (the model-dependent checks are the
    pipeline's, when it runs)."""
    from ..generation_config import GenerationConfig

    try:
        GenerationConfig(steps=preset.steps, sampler=preset.sampler, guidance_scale=preset.guidance_scale,
                         spacing=preset.spacing, analytic_first_step=preset.analytic_first_step)
    except UserError as err:
        raise UserError(f"preset {path}: {err}") from None
    if preset.accelerate:
        from .. import cache

        for item in filter(None, (p.strip() for p in preset.accelerate.split("+"))):
            try:
                cache.parse_spec(item)
            except ValueError as err:
                raise UserError(f"preset {path}: accelerate {item!r}: {err}") from None
