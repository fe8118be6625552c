"""First-Block Cache (ParaAttention, 2025; the residual-threshold cache of diffusers'
``FirstBlockCache`` and cache-dit's DBCache with one front block and none behind).

Every call runs the transformer's first block and measures how much its residual
r_1 = out_1 - in moved since the last fully computed call,
diff = mean|r_1 - r_1^ref| / mean|r_1^ref|.  Below ``threshold`` the other blocks are
skipped and the output is out_1 plus the residual they added on that last full call
(for MM-DiT blocks, for the image and the text stream alike); otherwise every block runs
and the references (r_1 and the tail's residual) are refreshed.  ``warmup`` first steps
always compute.  ``threshold=0`` computes every step and is exact.

Cached: the residual of blocks 2..N.  Refreshed: on computed calls only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..models.adapters import BlockGroup, adapter_for, supported
from .base import BranchStates, CacheHandle, hidden_states_of, hook_name, require_step


@dataclass
class FirstBlockCacheConfig:
    threshold: float = 0.08
    warmup: int = 0

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"fbcache threshold must be >= 0, got {self.threshold}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"fbcache warmup must be a whole number >= 0, got {self.warmup}")
        self.warmup = int(self.warmup)


class FBCacheState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.head_residual: torch.Tensor | None = None   # r_1 of the last computed call
        self.head_out: tuple | None = None                # the first block's outputs this call
        self.tail: tuple | None = None                    # residuals of blocks 2..N (per stream)
        self.skipping = False


def _streams(output, returns: str) -> tuple:
    """The block's outputs as (hidden, encoder-or-None)."""
    if returns == "encoder+hidden":
        return output[1], output[0]
    return (output[0] if isinstance(output, tuple) else output), None


def _pack(hidden, encoder, returns: str, like):
    if returns == "encoder+hidden":
        return encoder, hidden
    return (hidden,) + tuple(like[1:]) if isinstance(like, tuple) else hidden


def _inputs(args, kwargs) -> tuple:
    hidden = hidden_states_of(args, kwargs)
    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return hidden, encoder


def _add(a, b):
    return None if a is None or b is None else a + b


class HeadBlockHook(ModelHook):
    def __init__(self, states: BranchStates, config: FirstBlockCacheConfig, group: BlockGroup):
        super().__init__()
        self.states, self.config, self.returns = states, config, group.returns

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        state = self.states.get(ctx)
        hidden_in, _ = _inputs(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden, encoder = _streams(output, self.returns)
        residual = hidden - hidden_in
        state.skipping = (state.tail is not None and ctx.step_index >= self.config.warmup
                          and self._similar(residual, state.head_residual))
        if state.skipping:
            return _pack(hidden + state.tail[0], _add(encoder, state.tail[1]), self.returns, output)
        state.head_residual = residual
        state.head_out = (hidden, encoder)
        return output

    @torch.compiler.disable
    def _similar(self, residual: torch.Tensor, reference: torch.Tensor) -> bool:
        diff = (residual - reference).abs().mean() / reference.abs().mean().clamp(min=1e-12)
        return bool(diff < self.config.threshold)


class TailBlockHook(ModelHook):
    """Blocks 2..N: pass their inputs through while skipping; the last keeps the tail residual."""

    def __init__(self, states: BranchStates, group: BlockGroup, last: bool):
        super().__init__()
        self.states, self.returns, self.last = states, group.returns, last

    def new_forward(self, module, *args, **kwargs):
        state = self.states.get(require_step())
        if state.skipping:
            hidden, encoder = _inputs(args, kwargs)
            return (encoder, hidden) if self.returns == "encoder+hidden" else hidden
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            hidden, encoder = _streams(output, self.returns)
            head_hidden, head_encoder = state.head_out
            state.tail = (hidden - head_hidden,
                          None if encoder is None or head_encoder is None else encoder - head_encoder)
        return output


def apply_first_block_cache(model: torch.nn.Module, config: FirstBlockCacheConfig, handle: CacheHandle) -> None:
    adapter = adapter_for(model)
    if adapter.family != "dit":
        names = supported(lambda a: a.family == "dit")
        raise ValueError(f"fbcache supports transformers ({', '.join(names)}); {type(model).__name__} "
                         "is a UNet, whose skip connections need deepcache")
    blocks = [(group, block) for group, _, block in adapter.grouped(model)]
    if len(blocks) < 2:
        raise ValueError(f"fbcache needs at least 2 transformer blocks; {type(model).__name__} has {len(blocks)}")
    states = BranchStates(FBCacheState)
    handle.states.append(states)
    name = hook_name("fbcache")
    handle.register(blocks[0][1], HeadBlockHook(states, config, blocks[0][0]), name)
    for i, (group, block) in enumerate(blocks[1:], start=1):
        handle.register(block, TailBlockHook(states, group, last=i == len(blocks) - 1), name)
