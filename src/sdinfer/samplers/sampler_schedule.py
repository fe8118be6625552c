"""A different sampler per range of steps ("Sampler Scheduler for Diffusion Models",
Cheng 2023, arXiv:2311.06845).

The paper observes that every mainstream sampler's update is a step along the same
grid and can hand over to another one at any step; it schedules samplers by step
range and finds that a stochastic sampler in the early, high-noise steps followed by
an ODE sampler in the late steps beats either alone.  ``SamplerSchedule`` runs the
segments in turn on one grid:

    ddim:0-10,dpm-solver++:10-20        steps 0-9 DDIM, 10-19 DPM-Solver++(2M)
    dpm-solver++(order=3):0-50%,...     options in parentheses; ranges in % of the steps

Each segment's sampler keeps its own history (a multistep sampler starts again at
first order after a hand-over) and sees the step index and count of its segment (a
child ``SamplerState``); the model evaluations keep the run's own step context, which
the accelerators read.
The preset ``sampler-scheduler`` is the paper's SDE-then-ODE combination, with the
hand-over at half of the steps (the paper tunes the split per data set).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import StepSampler, steps_one_by_one

PRESETS = {"sampler-scheduler": "dpm-solver++-sde:0-50%,dpm-solver++:50%-100%"}
_ITEM = re.compile(r"^\s*([\w+.-]+)(?:\(([^)]*)\))?\s*:\s*(\d+%?)\s*-\s*(\d+%?)\s*$")


def is_schedule_spec(spec: str) -> bool:
    return spec.strip().lower() in PRESETS or bool(_ITEM.match(spec.split(",")[0])) and \
        all(_ITEM.match(item) for item in spec.split(","))


@dataclass
class _Segment:
    sampler: object
    start: str
    end: str

    def bounds(self, steps: int) -> tuple[int, int]:
        return _to_step(self.start, steps), _to_step(self.end, steps)


def _to_step(value: str, steps: int) -> int:
    return round(int(value[:-1]) * steps / 100) if value.endswith("%") else int(value)


class SamplerSchedule(StepSampler):
    name = "sampler-schedule"
    min_steps = 1

    def __init__(self, spec: str):
        from . import get_sampler

        self.spec = PRESETS.get(spec.strip().lower(), spec)
        self.segments = []
        for item in self.spec.split(","):
            m = _ITEM.match(item)
            if m is None:
                raise ValueError(f"sampler range {item!r} must look like NAME:START-END or "
                                 "NAME(key=value;...):START%-END%")
            name, opts, start, end = m.groups()
            options = ",".join(o.strip() for o in (opts or "").split(";") if o.strip())
            sampler = get_sampler(name + (":" + options if options else ""))
            if not steps_one_by_one(sampler):
                raise ValueError(f"sampler {name!r} runs its own loop over the steps (it chooses them "
                                 "or evaluates many at once), so it cannot take a range of steps; "
                                 "use it alone")
            self.segments.append(_Segment(sampler, start, end))
        spacings = {getattr(s.sampler, "spacing", "trailing") for s in self.segments}
        self.spacing = spacings.pop() if len(spacings) == 1 else "trailing"

    def check(self, steps: int) -> None:
        previous_end = 0
        for seg in self.segments:
            start, end = seg.bounds(steps)
            if start != previous_end or end <= start:
                raise ValueError(f"sampler ranges of {self.spec!r} must run 0-A, A-B, ... without "
                                 f"gaps or overlaps; at {steps} steps they are "
                                 f"{[s.bounds(steps) for s in self.segments]}")
            previous_end = end
        if previous_end != steps:
            raise ValueError(f"sampler ranges of {self.spec!r} end at step {previous_end}, "
                             f"not at the {steps} steps asked for; make the last range end at "
                             f"{steps} (or 100%)")

    def step(self, model, x, t, t_next, state):
        if "checked" not in state:   # the run's first step (step 0, or where a resumed run starts)
            self.check(state.num_steps)
            state["checked"] = True
        for k, seg in enumerate(self.segments):
            start, end = seg.bounds(state.num_steps)
            if start <= state.step_index < end:
                local = state.child(k, state.step_index - start, end - start)
                return seg.sampler.step(model, x, t, t_next, local)
        raise ValueError(f"step {state.step_index} lies in no range of {self.spec!r}")
