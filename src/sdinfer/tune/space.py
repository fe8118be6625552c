"""The search space of ``sdinfer tune`` as data.

A ``Space`` is a list of ``Axis`` (each a name and its values, in order) and the ordered step
counts.  A ``Setting`` is one value per axis; a ``Candidate`` is a setting at a step count (or
``"auto"``: StepSaver's predictor picks the count per prompt).  The search (``search.py``) sees
only settings, step counts and what an evaluator measures of them, so a new axis (quantization,
attention, a ``--parallel`` strategy) is one more ``Axis`` here, a ``rule`` if some of its values
do not combine with others, and the field of ``RunSpec`` it sets in ``Candidate.run_spec``.

``model_space`` builds the space a model supports: DPM-Solver-v3 only where the model ships its
statistics at the guidance scale, the ``gits`` / ``learned`` grids only where their artifacts
exist (a learned grid only at its learned step counts), the analytic first step on VP schedules,
each cache setting only where it installs on the model, ``auto`` steps where the model has a
step predictor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

# axis name -> the RunSpec field it sets (a new axis adds its field to RunSpec and a line here)
RUN_FIELDS = {"sampler": "sampler", "spacing": "spacing", "analytic_first_step": "analytic_first_step",
              "accelerate": "accelerate"}
DEFAULTS = {"sampler": "ddim", "spacing": None, "analytic_first_step": False, "accelerate": ""}

# the catalogue the model's space is filtered from
# (the sampler's own grid is trailing; logsnr, karras and the rest lose at the few steps a tuned
# preset runs, so they stay out of the default catalogue: a longer SPACINGS tuple brings them in)
SAMPLERS = ("ddim", "dpm-solver++", "unipc", "dpm-solver-v3")
SPACINGS = (None, "gits", "learned")
# caches whose schedule still skips something at 4-8 steps (an interval of 2); the threshold caches
# (TeaCache, MagCache) skip almost nothing there, Learning-to-Cache is fixed to one step count, and
# TaylorSeer at interval 2 needed 10-20 steps to keep adherence on the default UNet (a trial tune)
CACHES = ("", "deepcache:interval=2", "fora:interval=2", "fbcache:threshold=0.1")
STEPS = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20)
SMALL = dict(samplers=("ddim", "dpm-solver++"), spacings=(None,), caches=("",), first_step=(False,),
             steps=(3, 4, 5, 6, 8, 10, 15, 20))


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple


@dataclass(frozen=True)
class Setting:
    """One value per axis, as ``((name, value), ...)`` in the space's axis order."""

    values: tuple

    def get(self, name: str, default=None):
        return dict(self.values).get(name, DEFAULTS.get(name, default))

    @property
    def label(self) -> str:
        parts = []
        for name, value in self.values:
            if value in (None, "", False) and name != "sampler":
                continue
            parts.append("afs" if name == "analytic_first_step" else
                         f"grid={value}" if name == "spacing" else f"+ {value}" if name == "accelerate" else str(value))
        return " ".join(parts)


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    steps: int | str

    @property
    def label(self) -> str:
        head, _, rest = self.setting.label.partition(" ")
        return f"{head}:{self.steps}" + (f" {rest}" if rest else "")

    def run_spec(self, cfg: float):
        from ..eval.bench import RunSpec

        kwargs = {RUN_FIELDS[name]: value for name, value in self.setting.values if name in RUN_FIELDS}
        return RunSpec(steps=self.steps, cfg=cfg, **kwargs)

    def as_dict(self) -> dict:
        return {"label": self.label, "steps": self.steps,
                **{name: self.setting.get(name) for name in RUN_FIELDS}}


# a rule says why a setting (at a step count, None: any) cannot run, or None when it can
Rule = Callable[[Setting, "int | str | None"], "str | None"]


@dataclass
class Space:
    axes: list[Axis]
    steps: tuple[int, ...] = STEPS
    rules: list[Rule] = field(default_factory=list)
    per_prompt: tuple[Setting, ...] = ()     # settings also tried at steps "auto"

    def settings(self) -> list[Setting]:
        """Every combination of the axes' values that some step count can run."""
        out = []
        for combo in itertools.product(*(axis.values for axis in self.axes)):
            setting = Setting(tuple(zip((a.name for a in self.axes), combo)))
            if self.why_not(setting) is None and self.steps_for(setting):
                out.append(setting)
        return out

    def why_not(self, setting: Setting, steps=None) -> str | None:
        for rule in self.rules:
            reason = rule(setting, steps)
            if reason:
                return reason
        return None

    def steps_for(self, setting: Setting) -> tuple[int, ...]:
        """The step counts the setting runs at, ascending (the binary search's range)."""
        return tuple(s for s in sorted(self.steps) if self.why_not(setting, s) is None)

    def candidates(self) -> list[Candidate]:
        """Everything the exhaustive grid would evaluate."""
        out = [Candidate(s, n) for s in self.settings() for n in self.steps_for(s)]
        return out + [Candidate(s, "auto") for s in self.per_prompt]

    def describe(self) -> dict:
        return {"axes": {a.name: list(a.values) for a in self.axes}, "steps": list(self.steps),
                "settings": len(self.settings()), "candidates": len(self.candidates()),
                "per_prompt": [s.label for s in self.per_prompt]}


def step_rules(min_steps: Callable[[str], int]) -> Rule:
    """A sampler's own minimum step count; the analytic first step replaces one of >= 2 steps."""
    def rule(setting: Setting, steps) -> str | None:
        if steps is None or steps == "auto":
            return None
        if steps < min_steps(setting.get("sampler")):
            return "too few steps for the sampler"
        if setting.get("analytic_first_step") and steps < 2:
            return "the analytic first step needs 2 steps"
        return None
    return rule


def model_space(pipe, cfg: float, size: str = "full", samplers=None, caches=None, steps=None,
                spacings=None) -> Space:
    """The space ``pipe``'s model supports (see the module docstring); ``size="small"``: two
    samplers, the sampler's own grid, no cache (what the exhaustive comparison runs)."""
    from ..errors import UserError
    from ..generation_config import GenerationConfig
    from ..models import artifacts

    model = pipe.model
    base = SMALL if size == "small" else dict(samplers=SAMPLERS, spacings=SPACINGS, caches=CACHES,
                                              first_step=(False, True), steps=STEPS)
    samplers = tuple(samplers or base["samplers"])
    caches = tuple(base["caches"] if caches is None else caches)
    steps = tuple(sorted(steps or base["steps"]))
    has = {kind: artifacts.find(model.path, kind, cfg) is not None for kind in ("dpm-solver-v3", "gits", "learned-grid")}
    samplers = tuple(s for s in samplers if s != "dpm-solver-v3" or has["dpm-solver-v3"])
    if not samplers:
        raise UserError(f"model {model.name} supports none of the samplers asked for")
    spacings = tuple(s for s in (base["spacings"] if spacings is None else spacings)
                     if s is None or (s == "gits" and has["gits"]) or (s == "learned" and has["learned-grid"])
                     or (s not in ("gits", "learned") and not model.schedule.is_flow))
    first_step = base["first_step"] if not model.schedule.is_flow else (False,)
    installs = tuple(c for c in caches if not c or _installs(pipe, c))
    learned = _learned_entries(model, cfg) if "learned" in spacings else {}

    def min_steps(sampler: str) -> int:
        return GenerationConfig(steps=1000, sampler=sampler).make_sampler().min_steps

    def learned_rule(setting: Setting, n) -> str | None:
        if setting.get("spacing") != "learned":
            return None
        have = learned.get(setting.get("sampler"), ())
        if not have:
            return "no learned grid for this sampler"
        return None if n is None or n in have else "no learned grid at this step count"

    def first_step_rule(setting: Setting, n) -> str | None:
        if not setting.get("analytic_first_step"):
            return None
        try:
            GenerationConfig(steps=10, sampler=setting.get("sampler"), analytic_first_step=True)
        except UserError as err:
            return str(err)
        return None

    axes = [Axis("sampler", samplers), Axis("spacing", spacings), Axis("analytic_first_step", first_step),
            Axis("accelerate", installs)]
    space = Space(axes, steps, [step_rules(min_steps), learned_rule, first_step_rule])
    if artifacts.find(model.path, "stepsaver") is not None and "ddim" in samplers:
        # the predictor was fit to DDIM's fewest steps per prompt: tried with DDIM, uncached
        space.per_prompt = (Setting(tuple((a.name, DEFAULTS[a.name]) for a in axes)),)
    return space


def _installs(pipe, spec: str) -> bool:
    from ..accelerate import accelerate
    from ..errors import UserError

    try:
        accelerate(pipe, spec).remove()
    except (UserError, ValueError, TypeError):
        return False
    return True


def _learned_entries(model, cfg: float) -> dict[str, tuple[int, ...]]:
    from ..models import artifacts
    from ..samplers.learned_grid import LearnedGrids

    path = artifacts.find(model.path, "learned-grid", cfg)
    if path is None:
        return {}
    out: dict[str, list[int]] = {}
    for sampler, n in LearnedGrids.load(path).entries():
        out.setdefault(sampler, []).append(n)
    return {k: tuple(v) for k, v in out.items()}
