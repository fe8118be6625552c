"""The step context: what the sampling loop tells every accelerator.

The loop sets it before each denoiser call; caches and other accelerators read
it with ``current_step()`` to decide what to compute.  Inside a stock diffusers
pipeline, where sdinfer does not own the loop, an accelerator infers the same
fields from the model's forward calls instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    step_index: int      # 0-based index of the denoising step
    num_steps: int       # steps in this generation
    t: float             # continuous time in (0, 1]
    model_t: float       # the model's own timestep convention
    branch: str = "both"  # classifier-free guidance branch: "cond", "uncond" or "both" (batched)
    generation: int = 0   # increments with every generation, so state can tell a new request
    # the branch held by each half of a batched-guidance call (branch "both"), in batch order:
    # sdinfer's denoiser batches [cond, uncond], diffusers' text-to-image pipelines [uncond, cond];
    # None where the batch is not split between guidance branches (or its split is unknown)
    guidance_halves: tuple[str, str] | None = ("cond", "uncond")
    # the next step's timestep in the model's convention, where the loop knows it (None on the
    # last step and where the context is inferred from the model's calls)
    next_model_t: float | None = None

    @property
    def is_first(self) -> bool:
        return self.step_index == 0

    @property
    def is_last(self) -> bool:
        return self.step_index == self.num_steps - 1


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "sdinfer_step_context", default=None)


def current_step() -> StepContext | None:
    """The context of the step being computed, or None outside a sampling loop."""
    return _current.get()


@contextlib.contextmanager
def step_context(ctx: StepContext):
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
