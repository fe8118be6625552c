"""DBCache, Dual Block Cache (cache-dit, vipshop, 2025; the residual-threshold cache of
First-Block Cache, ParaAttention 2025, with front and back blocks that always compute).

A transformer's blocks are split into the first ``fn``, the middle and the last ``bn``.
Every call runs the first ``fn`` blocks and measures how much their residual
r = h_fn - h_0 moved since the last computed call,
diff = mean|r - r_ref| / mean|r_ref|.
Below ``threshold`` the middle blocks are skipped: they pass their inputs through, and
the output of the front blocks gets the residual the middle blocks added on the last
computed call (for MM-DiT blocks on the image and the text stream alike); otherwise the
middle blocks run, and r_ref and their residual are refreshed.  The last ``bn`` blocks
always run, on the approximated stream, as a corrector.  Limits: the first ``warmup``
steps always compute; ``max_cached_steps`` caps the skipped steps of a generation and
``max_continuous_cached_steps`` the skipped steps in a row (0: no cap; cache-dit's -1).

TaylorSeer calibrator (``taylorseer=true``; Liu et al., ICCV 2025): the middle residual is
not reused frozen but forecast by a Taylor series of ``order`` 1 or 2 in the step index,
its factors updated by divided differences over the computed steps (``TaylorSeries``).

Cached: the middle blocks' residual, per stream.  Refreshed: on computed calls only.
``threshold=0`` computes every step and is exact.  First-Block Cache is fn=1, bn=0 without
the calibrator.  Defaults (fn=1, bn=0, threshold 0.12, the calibrator of order 1) chosen on the
default DiT, where the calibrator kept more PSNR than the frozen residual and a back block (bn=1)
lowered it; their speed-up and PSNR: BENCHMARKS.md, feature caches on the default models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.hooks import ModelHook

from ..models.adapters import BlockGroup, adapter_for, supported
from .base import (BranchStates, CacheConfig, CacheHandle, hidden_states_of, hook_name, relative_change,
                   require_step, whole_number)
from .block_stack import add_stream, streams_of, sub_stream
from .taylorseer import TaylorSeries

CALIBRATOR_ORDERS = (1, 2)


@dataclass
class DBCacheConfig(CacheConfig):
    fn: int = 1
    bn: int = 0
    threshold: float = 0.12
    warmup: int = 0
    max_cached_steps: int = 0
    max_continuous_cached_steps: int = 0
    taylorseer: bool = True
    order: int = 1
    method: ClassVar[str] = "dbcache"   # the name errors use (First-Block Cache reuses this config)

    def __post_init__(self) -> None:
        self.fn = self._whole("fn", self.fn, 1)
        self.bn = self._whole("bn", self.bn, 0)
        self.warmup = self._whole("warmup", self.warmup, 0)
        self.max_cached_steps = self._whole("max_cached_steps", self.max_cached_steps, 0, " (0: no cap)")
        self.max_continuous_cached_steps = self._whole("max_continuous_cached_steps",
                                                       self.max_continuous_cached_steps, 0, " (0: no cap)")
        if not self.threshold >= 0:
            raise ValueError(f"{self.method} threshold must be >= 0, got {self.threshold}")
        if self.order not in CALIBRATOR_ORDERS:
            raise ValueError(f"{self.method} order must be one of {', '.join(map(str, CALIBRATOR_ORDERS))} "
                             f"(the TaylorSeer calibrator's), got {self.order}")
        self.order = int(self.order)

    def _whole(self, knob: str, value, least: int, note: str = "") -> int:
        return whole_number(self.method, knob, value, least, note)

    @property
    def taylor_order(self) -> int:
        """Order of the middle residual's series: 0 reuses it as it was computed."""
        return self.order if self.taylorseer else 0


class DBCacheState:
    def __init__(self, order: int) -> None:
        self.order = order
        self.reset()

    def reset(self) -> None:
        self.front_in: torch.Tensor | None = None     # hidden input of the first block, this call
        self.reference: torch.Tensor | None = None    # r of the last computed call
        self.front_out: tuple | None = None           # (hidden, encoder) after the front blocks, this call
        self.middle = TaylorSeries(self.order)        # the middle blocks' (hidden, encoder) residual
        self.skipping = False
        self.cached_steps = 0
        self.cached_in_a_row = 0


def _pack(hidden, encoder, returns: str, like):
    if returns == "encoder+hidden":
        return encoder, hidden
    return (hidden,) + tuple(like[1:]) if isinstance(like, tuple) else hidden


def _inputs(args, kwargs) -> tuple:
    hidden = hidden_states_of(args, kwargs)
    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return hidden, encoder


class FrontEntryHook(ModelHook):
    """The first block, when the front has several: notes the input the residual starts from."""

    def __init__(self, states: BranchStates):
        super().__init__()
        self.states = states

    def new_forward(self, module, *args, **kwargs):
        self.states.get(require_step()).front_in = hidden_states_of(args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class FrontLastHook(ModelHook):
    """The last front block: measures the front residual and decides whether the middle runs;
    when it does not, adds the middle's (forecast) residual here."""

    def __init__(self, states: BranchStates, config: DBCacheConfig, group: BlockGroup, single: bool):
        super().__init__()
        self.states, self.config, self.returns, self.single = states, config, group.returns, single

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        state = self.states.get(ctx)
        if self.single:
            state.front_in = hidden_states_of(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden, encoder = streams_of(output, self.returns)
        residual = hidden - state.front_in
        state.skipping = self._may_skip(state, ctx.step_index) and self._similar(residual, state.reference)
        if state.skipping:
            state.cached_steps += 1
            state.cached_in_a_row += 1
            middle_hidden, middle_encoder = state.middle.forecast(ctx.step_index)
            return _pack(hidden + middle_hidden, add_stream(encoder, middle_encoder), self.returns, output)
        state.cached_in_a_row = 0
        state.reference = residual
        state.front_out = (hidden, encoder)
        return output

    def _may_skip(self, state: DBCacheState, step: int) -> bool:
        config = self.config
        return (state.middle.step is not None and step >= config.warmup
                and (config.max_cached_steps == 0 or state.cached_steps < config.max_cached_steps)
                and (config.max_continuous_cached_steps == 0
                     or state.cached_in_a_row < config.max_continuous_cached_steps))

    def _similar(self, residual: torch.Tensor, reference: torch.Tensor) -> bool:
        return relative_change(residual, reference) < self.config.threshold


class MiddleBlockHook(ModelHook):
    """A middle block: passes its inputs through while skipping; the last keeps the middle residual."""

    def __init__(self, states: BranchStates, group: BlockGroup, last: bool):
        super().__init__()
        self.states, self.returns, self.last = states, group.returns, last

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        state = self.states.get(ctx)
        if state.skipping:
            hidden, encoder = _inputs(args, kwargs)
            return (encoder, hidden) if self.returns == "encoder+hidden" else hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            hidden, encoder = streams_of(output, self.returns)
            front_hidden, front_encoder = state.front_out
            state.middle.update((hidden - front_hidden, sub_stream(encoder, front_encoder)), ctx.step_index)
        return output


def apply_dbcache(model: torch.nn.Module, config: DBCacheConfig, handle: CacheHandle) -> None:
    method = config.method
    adapter = adapter_for(model)
    if adapter.family != "dit":
        names = supported(lambda a: a.family == "dit")
        raise ValueError(f"{method} supports transformers ({', '.join(names)}); {type(model).__name__} "
                         "is a UNet, whose skip connections leave no chain of blocks to split: use deepcache")
    blocks = [(group, block) for group, _, block in adapter.grouped(model)]
    fn, bn = config.fn, config.bn
    if fn + bn >= len(blocks):
        raise ValueError(f"{method} computes the first {fn} and the last {bn} of the {len(blocks)} blocks of "
                         f"{type(model).__name__}, which leaves no middle block to cache (fn + bn must be "
                         f"at most {len(blocks) - 1})")
    states = BranchStates(lambda: DBCacheState(config.taylor_order))
    handle.states.append(states)
    name = hook_name(method)
    if fn > 1:
        handle.register(blocks[0][1], FrontEntryHook(states), name)
    group, block = blocks[fn - 1]
    handle.register(block, FrontLastHook(states, config, group, single=fn == 1), name)
    middle = blocks[fn:len(blocks) - bn]
    for i, (group, block) in enumerate(middle):
        handle.register(block, MiddleBlockHook(states, group, last=i == len(middle) - 1), name)
