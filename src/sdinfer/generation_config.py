"""The options of one generation, checked once: ``GenerationConfig`` refuses a bad value with a
``UserError`` as it is made, before any model runs.  ``Pipeline.__call__`` builds one from its
keyword arguments (or takes one given), and ``sdinfer generate`` builds the same from its flags
before it loads the model.  What depends on the model (the size it takes, the files beside it)
is checked by the pipeline."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import UserError

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


@dataclass(frozen=True)
class GenerationConfig:
    """``steps``: a count or ``"auto"`` (StepSaver picks it; resolve with ``with_steps``).
    ``spacing``: a grid name, ``"gits"``, ``"learned"`` or a grid object (checked against the
    model by the pipeline).  The other fields as ``Pipeline.__call__`` documents them."""

    steps: int | str = DEFAULT_STEPS
    sampler: str = "ddim"
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = 0
    size: int | None = None
    spacing: object = None
    analytic_first_step: bool = False
    final: str = "zero"

    def __post_init__(self) -> None:
        from .samplers.base import FINALS

        if self.steps != "auto":
            if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
                raise UserError(f"steps must be a whole number or 'auto', got {self.steps!r}")
            if self.steps < 1:
                raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise UserError(f"guidance scale (cfg) must be >= 0, got {self.guidance_scale}")
        if self.size is not None and self.size < 1:
            raise UserError(f"size must be a positive number of pixels, got {self.size}")
        if self.final not in FINALS:
            raise UserError(f"unknown final time {self.final!r}; choose one of {', '.join(FINALS)}")
        if self.sampler == "auto":
            self._check_auto()
            return
        solver = self.make_sampler()
        if self.steps == "auto":
            return
        if self.steps < solver.min_steps:
            raise UserError(f"sampler {solver.name!r} needs at least {solver.min_steps} steps, "
                            f"got {self.steps}")
        if self.analytic_first_step:
            from .samplers.analytic_first_step import check_supports

            if self.steps < 2:
                raise UserError(f"the analytic first step replaces the first of at least 2 steps, "
                                f"got {self.steps}")
            try:
                check_supports(solver)
            except ValueError as err:
                raise UserError(str(err)) from None

    def _check_auto(self) -> None:
        """``sampler="auto"`` chooses the sampler, grid and first step per NFE (``auto_sampler.py``)."""
        if self.steps == "auto":
            raise UserError("sampler 'auto' takes a step count (the NFE), not steps='auto'")
        if self.spacing is not None or self.analytic_first_step or self.final != "zero":
            raise UserError("sampler 'auto' chooses the time grid and the first step itself; leave spacing, "
                            "analytic_first_step and final unset")

    def make_sampler(self):
        """A fresh sampler object for ``sampler`` (samplers keep per-run state)."""
        from .samplers import get_sampler

        try:
            return get_sampler(self.sampler)
        except ValueError as err:
            raise UserError(str(err)) from None

    def with_steps(self, steps: int) -> "GenerationConfig":
        """The same options at ``steps`` (what ``"auto"`` resolved to), checked again."""
        return dataclasses.replace(self, steps=steps)
