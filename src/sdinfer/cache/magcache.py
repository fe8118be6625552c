"""MagCache (Ma, Wei, Wang et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache",
NeurIPS 2025).

The "magnitude law": the residual the whole block stack adds, r_t = out_t - in_t, changes its
norm across steps by a ratio gamma_t = ||r_t|| / ||r_{t-1}|| that is stable across prompts and
falls steadily late in the run, so the error of reusing a residual can be estimated before
computing anything.  Past the first ``retention`` fraction of the run, each call multiplies
the ratio into an accumulator, ratio *= gamma_t, and adds the error of reuse, err += |1 - ratio|.
While err < ``threshold`` and no more than ``max_skip_steps`` calls have been skipped in a row,
the whole block stack is skipped (``block_stack.py``) and its input gets the residual of its
last computed call, as it was (the reference code adds it unscaled, and so does this: the ratio
only bounds the error); otherwise the stack runs and the three accumulators reset.

gamma is the model's calibration (``sdinfer calibrate --method magcache``): per step, the mean
over the calibration samples of ||r_t|| / ||r_{t-1}|| (each sample's whole residual; in a
batched-guidance call the cond and uncond halves together, as one decision covers both).  A
run of another step count reads the calibrated magnitude curve log||r|| (the cumulative sum of
log gamma) at its own steps, linearly over the run's progress; a bare model called outside any
pipeline, whose step count is unknown, is taken to run the calibrated count.

Cached: the residual of the whole block stack (per stream on MM-DiT).  Refreshed: on computed
calls.  ``threshold=0`` (or ``max_skip_steps=0``) computes every step and is exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..models.adapters import adapter_for
from .base import BranchStates, CacheConfig, CacheHandle, whole_number
from .block_stack import StackState, install_stack_hooks, load_stack_calibration
from .calibration import Calibration, CalibrationRun, register_calibrator

METHOD = "magcache"


@dataclass
class MagCacheConfig(CacheConfig):
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention: float = 0.2
    calibration: str = ""   # a calibration file; "": the one beside the model's weights

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"magcache threshold must be >= 0 (0: compute every step), got {self.threshold}")
        self.max_skip_steps = whole_number("magcache", "max_skip_steps", self.max_skip_steps, 0)
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"magcache retention must lie in [0, 1] (a fraction of the steps), got {self.retention}")


def ratios_for(calibrated: np.ndarray, num_steps: int) -> np.ndarray:
    """gamma of each step of a run of ``num_steps``, from the calibrated ratios of another count."""
    log_magnitude = np.cumsum(np.log(calibrated))
    progress = np.linspace(0.0, len(calibrated) - 1, num_steps)
    at_steps = np.interp(progress, np.arange(len(calibrated)), log_magnitude)
    return np.exp(np.diff(at_steps, prepend=at_steps[:1]))


class MagCacheState(StackState):
    def reset(self) -> None:
        super().reset()
        self.ratio = 1.0     # product of gamma since the last computed call
        self.error = 0.0     # sum of |1 - ratio| since then
        self.skipped = 0     # calls skipped since then


class MagCachePolicy:
    def __init__(self, config: MagCacheConfig, calibrated: np.ndarray):
        self.config, self.calibrated = config, calibrated
        self.ratios = lru_cache(maxsize=8)(lambda n: ratios_for(calibrated, n))

    def skip(self, state: MagCacheState, ctx, first_block, args, kwargs) -> bool:
        num_steps = ctx.num_steps or len(self.calibrated)   # 0: unknown
        if state.residual is None or ctx.step_index < int(self.config.retention * num_steps + 0.5):
            return False
        gammas = self.ratios(num_steps)
        state.ratio *= float(gammas[min(ctx.step_index, num_steps - 1)])
        state.error += abs(1.0 - state.ratio)
        state.skipped += 1
        if state.error < self.config.threshold and state.skipped <= self.config.max_skip_steps:
            return True
        state.ratio, state.error, state.skipped = 1.0, 0.0, 0
        return False

    def computed(self, state, ctx, residual) -> None:
        pass


def apply_magcache(model: torch.nn.Module, config: MagCacheConfig, handle: CacheHandle) -> None:
    adapter = adapter_for(model)
    calibration = load_stack_calibration(model, METHOD, config.calibration)
    policy = MagCachePolicy(config, calibration.tensors["ratios"].double().numpy())
    states = BranchStates(MagCacheState)
    handle.states.append(states)
    install_stack_hooks(model, adapter, policy, states, handle, METHOD)


# --- calibration ----------------------------------------------------------------------------------
def _norms(residual: torch.Tensor) -> torch.Tensor:
    return residual.flatten(1).float().norm(dim=1)


class RatioRecorder:
    """Never skips; records each sample's ||r_t|| / ||r_{t-1}|| per step, with its guidance branch."""

    def __init__(self) -> None:
        self.ratios: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.branches: dict[str, list[torch.Tensor]] = defaultdict(list)

    def skip(self, state, ctx, first_block, args, kwargs) -> bool:
        return False

    def computed(self, state, ctx, residual) -> None:
        if state.residual is None:
            return
        ratio = _norms(residual[0]) / _norms(state.residual[0]).clamp(min=1e-12)
        self.ratios[ctx.step_index].append(ratio)
        if ctx.guidance_halves:
            for branch, half in zip(ctx.guidance_halves, ratio.chunk(2)):
                self.branches[branch].append(half.mean())


def calibrate_magcache(run: CalibrationRun) -> Calibration:
    model = run.pipe.model.denoiser
    recorder = RatioRecorder()
    handle = CacheHandle(f"{METHOD}-calibration")
    install_stack_hooks(model, adapter_for(model), recorder, BranchStates(MagCacheState), handle, METHOD)
    try:
        run.generate()
    finally:
        handle.remove()
    ratios = torch.ones(run.steps, dtype=torch.float64)
    for step, values in recorder.ratios.items():
        ratios[step] = torch.cat(values).cpu().double().mean()
    meta = {"denoiser": type(model).__name__, "samples": len(run.prompts), "steps": run.steps,
            "sampler": run.sampler, "guidance_scale": run.guidance_scale}
    if len(recorder.branches) == 2:
        cond, uncond = (torch.stack(recorder.branches[b]) for b in ("cond", "uncond"))
        meta["max_branch_gap"] = float((cond - uncond).abs().max())   # how far one joint curve is from each
    return Calibration(METHOD, {"ratios": ratios.float()}, meta)


register_calibrator(METHOD, calibrate_magcache)
