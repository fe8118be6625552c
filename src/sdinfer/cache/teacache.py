"""TeaCache (Liu, Zhang, Ma et al., "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model", CVPR 2025).

How much the model's output will move from one step to the next is read off a cheap input:
the timestep-embedding-modulated input m_t of the first block (its adaLN output
norm1(x_t, temb); on a UNet, the first ResNet's normalised input shifted by its own time
embedding, the two terms that ResNet adds).  Each call measures
rel_t = mean|m_t - m_{t-1}| / mean|m_{t-1}| and accumulates the output change it predicts,
acc += p(rel_t), with p the model's rescaling polynomial.  While acc < ``threshold`` the whole
block stack is skipped (``block_stack.py``) and its input gets the residual the stack added
on its last computed call; otherwise the stack runs, that residual is refreshed and acc = 0.
The first step, and the last where the step count is known, always compute.

p is fitted per model, as TeaCache fits it (``sdinfer calibrate --method teacache``): over
the calibration runs, each sample's (rel of m, relative L1 change of the stack's residual)
between consecutive steps, and the least-squares polynomial of degree 4 through those pairs
(numpy.polyfit).  The calibration is found beside the model's weights or at ``calibration``.
Outside the range of changes it was fitted on, p is read at the nearer end and scaled in
proportion (a quartic's tails turn over, and would call the largest changes small); an
estimate below zero counts as none.

Cached: the residual of the whole block stack (per stream on MM-DiT).  Refreshed: on computed
calls.  ``threshold=0`` computes every step and is exact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..models.adapters import adapter_for, supported
from .base import BranchStates, CacheConfig, CacheHandle, relative_change
from .block_stack import StackState, install_stack_hooks, load_stack_calibration, stack_blocks
from .calibration import Calibration, CalibrationRun, register_calibrator

METHOD = "teacache"
DEGREE = 4   # TeaCache's rescaling polynomials are quartics


@dataclass
class TeaCacheConfig(CacheConfig):
    threshold: float = 0.1
    calibration: str = ""   # a calibration file; "": the one beside the model's weights

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"teacache threshold must be >= 0 (0: compute every step), got {self.threshold}")


# --- the indicator: each adapter's modulated input of its first block ----------------------------
def _adaln_emb(block, arguments: dict) -> torch.Tensor:
    """SD3 / FLUX joint blocks: AdaLayerNormZero(x, emb=temb)."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


BASIC_NORMS = ("ada_norm_zero", "ada_norm_single", "ada_norm")


def _basic(block, arguments: dict) -> torch.Tensor:
    """diffusers' BasicTransformerBlock, as its norm_type modulates."""
    hidden, timestep = arguments["hidden_states"], arguments.get("timestep")
    if block.norm_type == "ada_norm_zero":     # DiT: the norm embeds timestep and class label itself
        return block.norm1(hidden, timestep, arguments.get("class_labels"), hidden_dtype=hidden.dtype)[0]
    if block.norm_type == "ada_norm_single":   # PixArt: the model's adaLN-single embedding + the block's table
        shift, scale = (block.scale_shift_table[None] + timestep.reshape(len(hidden), 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(hidden) * (1 + scale) + shift
    return block.norm1(hidden, timestep)


def _resnet(block, arguments: dict) -> torch.Tensor:
    """A UNet block: its first ResNet's normalised input and time embedding, as that ResNet adds them."""
    resnet = block.resnets[0]
    temb = arguments["temb"] if resnet.skip_time_act else resnet.nonlinearity(arguments["temb"])
    emb = resnet.time_emb_proj(temb)[:, :, None, None]
    normed = resnet.norm1(arguments["hidden_states"])
    if resnet.time_embedding_norm == "scale_shift":
        scale, shift = emb.chunk(2, dim=1)
        return normed * (1 + scale) + shift
    return normed + emb


INDICATORS: dict[str, Callable] = {"adaln-emb": _adaln_emb, "basic": _basic, "resnet": _resnet}


def _unsupported_block(modulation: str, block: torch.nn.Module) -> str | None:
    """Why the indicator cannot be read off this first block, if it cannot."""
    if modulation == "basic" and getattr(block, "norm_type", None) not in BASIC_NORMS:
        return f"its blocks' norm_type {getattr(block, 'norm_type', None)!r} is not timestep-modulated"
    if modulation == "resnet":
        resnet = block.resnets[0]
        if resnet.time_emb_proj is None:
            return "its first ResNet takes no time embedding"
        if resnet.in_channels != resnet.out_channels:
            return "its first ResNet changes the channel count"
    return None


def indicator_for(model: torch.nn.Module) -> Callable[[torch.nn.Module, tuple, dict], torch.Tensor]:
    """``indicator(first_block, args, kwargs)``: the modulated input of ``model``'s first block."""
    adapter = adapter_for(model)
    group, block = stack_blocks(model, adapter)[0]
    if group.modulation not in INDICATORS:
        names = supported(lambda a: bool(a.groups) and a.groups[0].modulation in INDICATORS)
        raise ValueError(f"teacache supports models whose adapter declares how the first block modulates its "
                         f"input by the timestep ({', '.join(names)}); {type(model).__name__} declares none")
    reason = _unsupported_block(group.modulation, block)
    if reason:
        raise ValueError(f"teacache cannot read the timestep-modulated input of {type(model).__name__}: {reason}")
    read = INDICATORS[group.modulation]
    signature = inspect.signature(type(block).forward)

    def indicator(first_block, args: tuple, kwargs: dict) -> torch.Tensor:
        return read(first_block, signature.bind(first_block, *args, **kwargs).arguments)

    return indicator


# --- inference ------------------------------------------------------------------------------------
class TeaCacheState(StackState):
    def reset(self) -> None:
        super().reset()
        self.previous: torch.Tensor | None = None   # m of the previous call
        self.accumulated = 0.0                       # sum of p(rel) since the last computed call


class Rescaling:
    """The calibrated polynomial p, trusted on the range of indicator changes it was fitted on;
    outside it, p at the nearer end scaled in proportion to the change (a quartic's tails turn)."""

    def __init__(self, coefficients: np.ndarray, fitted_range: np.ndarray):
        self.coefficients, (self.low, self.high) = coefficients, fitted_range

    def __call__(self, rel: float) -> float:
        end = min(max(rel, self.low), self.high)
        return max(0.0, float(np.polyval(self.coefficients, end))) * rel / end if end > 0 else 0.0


class TeaCachePolicy:
    def __init__(self, threshold: float, rescale: Rescaling, indicator: Callable):
        self.threshold, self.rescale, self.indicator = threshold, rescale, indicator

    def skip(self, state: TeaCacheState, ctx, first_block, args, kwargs) -> bool:
        current = self.indicator(first_block, args, kwargs)
        previous, state.previous = state.previous, current
        if previous is None or state.residual is None or ctx.is_first or ctx.is_last:
            state.accumulated = 0.0
            return False
        state.accumulated += self._estimated_change(current, previous)
        if state.accumulated < self.threshold:
            return True
        state.accumulated = 0.0
        return False

    def _estimated_change(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        return self.rescale(relative_change(current, previous))

    def computed(self, state, ctx, residual) -> None:
        pass


def apply_teacache(model: torch.nn.Module, config: TeaCacheConfig, handle: CacheHandle) -> None:
    indicator = indicator_for(model)
    calibration = load_stack_calibration(model, METHOD, config.calibration)
    tensors = {k: v.double().numpy() for k, v in calibration.tensors.items()}
    policy = TeaCachePolicy(config.threshold, Rescaling(tensors["coefficients"], tensors["fitted_range"]), indicator)
    states = BranchStates(TeaCacheState)
    handle.states.append(states)
    install_stack_hooks(model, adapter_for(model), policy, states, handle, METHOD)


# --- calibration ----------------------------------------------------------------------------------
def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|current - previous| / mean|previous| of each sample of a batch."""
    dims = tuple(range(1, current.ndim))
    current, previous = current.float(), previous.float()
    return (current - previous).abs().mean(dims) / previous.abs().mean(dims).clamp(min=1e-12)


class ChangeRecorder:
    """Never skips; records each sample's (indicator change, residual change) between calls."""

    def __init__(self, indicator: Callable):
        self.indicator = indicator
        self.pending: torch.Tensor | None = None
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def skip(self, state: TeaCacheState, ctx, first_block, args, kwargs) -> bool:
        current = self.indicator(first_block, args, kwargs)
        self.pending = None if state.previous is None else relative_l1(current, state.previous)
        state.previous = current
        return False

    def computed(self, state, ctx, residual) -> None:
        if self.pending is not None and state.residual is not None:
            self.pairs.append((self.pending, relative_l1(residual[0], state.residual[0])))


def calibrate_teacache(run: CalibrationRun) -> Calibration:
    model = run.pipe.model.denoiser
    recorder = ChangeRecorder(indicator_for(model))
    handle = CacheHandle(f"{METHOD}-calibration")
    install_stack_hooks(model, adapter_for(model), recorder, BranchStates(TeaCacheState), handle, METHOD)
    try:
        run.generate()
    finally:
        handle.remove()
    x = torch.cat([x for x, _ in recorder.pairs]).cpu().double().numpy()
    y = torch.cat([y for _, y in recorder.pairs]).cpu().double().numpy()
    if len(x) <= DEGREE:
        raise ValueError(f"teacache's polynomial of degree {DEGREE} needs more than {DEGREE} pairs of changes "
                         f"between steps; these runs gave {len(x)}: calibrate on more samples or steps")
    coefficients = np.polyfit(x, y, DEGREE)
    fitted = np.polyval(coefficients, x)
    meta = {"denoiser": type(model).__name__, "samples": len(run.prompts), "steps": run.steps,
            "sampler": run.sampler, "guidance_scale": run.guidance_scale, "pairs": int(len(x)),
            "r2": float(1 - ((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum())}
    fitted_range = torch.tensor([x.min(), x.max()], dtype=torch.float64)
    return Calibration(METHOD, {"coefficients": torch.from_numpy(coefficients), "fitted_range": fitted_range}, meta)


register_calibrator(METHOD, calibrate_teacache)
