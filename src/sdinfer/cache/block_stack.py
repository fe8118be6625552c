"""Skipping a model's whole block stack: the hooks TeaCache and MagCache share.

The stack is every block the model adapter names, in forward order: a transformer's blocks,
or a UNet's down, mid and up blocks (the input of the first down block and the output of the
last up block have the same shape, so the stack's residual out - in is defined).  The
method's ``StackPolicy`` decides at the first block, once per call, whether the stack runs.
While it is skipped no block runs: each hands its input on (a down block hands placeholders
to the UNet's skip list, which only the skipped up blocks read) and the last one returns the
stack's input plus the residual the stack added on its last computed call, per stream on
MM-DiT (image and text).  On computed calls the last block refreshes that residual and shows
it to the policy first.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers.hooks import ModelHook

from ..context import StepContext
from ..models.adapters import BlockGroup, ModelAdapter
from .base import BranchStates, CacheHandle, hidden_states_of, hook_name, require_step
from .calibration import Calibration, load_for


class StackState:
    """Per-branch state of a whole-stack cache (methods extend it with their accumulators)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.inputs: tuple | None = None     # (hidden, encoder-or-None) entering the stack this call
        self.residual: tuple | None = None   # (hidden, encoder-or-None) it added on its last computed call
        self.skipping = False


class StackPolicy(Protocol):
    def skip(self, state: StackState, ctx: StepContext, first_block: torch.nn.Module,
             args: tuple, kwargs: dict) -> bool:
        """Whether this call skips the stack; called on every call, True only where
        ``state.residual`` is kept."""

    def computed(self, state: StackState, ctx: StepContext, residual: tuple) -> None:
        """Sees the residual of a computed call before it replaces ``state.residual``."""


def streams_of(output, returns: str) -> tuple:
    """A block's output as (hidden, encoder-or-None) (``returns``: its ``BlockGroup.returns``)."""
    if returns == "encoder+hidden":
        return output[1], output[0]
    return (output[0] if isinstance(output, tuple) else output), None


def add_stream(a, b):
    """a + b, None where either stream is absent (a block with no text stream)."""
    return None if a is None or b is None else a + b


def sub_stream(a, b):
    """a - b, None where either stream is absent."""
    return None if a is None or b is None else a - b


class StackBlockHook(ModelHook):
    """One block of the stack; the first decides for the call, the last keeps the residual."""

    def __init__(self, states: BranchStates, policy: StackPolicy, returns: str, first: bool, last: bool):
        super().__init__()
        self.states, self.policy, self.returns = states, policy, returns
        self.first, self.last = first, last
        self.skip_count = 0   # tensors this block adds to a UNet's skip list (a down block)

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        state = self.states.get(ctx)
        if self.first:
            state.inputs = self._streams_in(args, kwargs)
            state.skipping = self.policy.skip(state, ctx, module, args, kwargs)
        if state.skipping:
            return self._hand_on(state, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.returns == "hidden+skips":
            self.skip_count = len(output[1])
        if self.last:
            hidden, encoder = streams_of(output, self.returns)
            residual = (hidden - state.inputs[0], sub_stream(encoder, state.inputs[1]))
            self.policy.computed(state, ctx, residual)
            state.residual = residual
        return output

    def _streams_in(self, args: tuple, kwargs: dict) -> tuple:
        encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return hidden_states_of(args, kwargs), encoder if self.returns == "encoder+hidden" else None

    def _hand_on(self, state: StackState, args: tuple, kwargs: dict):
        hidden, encoder = self._streams_in(args, kwargs)
        if self.last:
            hidden = state.inputs[0] + state.residual[0]
            encoder = add_stream(state.inputs[1], state.residual[1])
        if self.returns == "hidden+skips":
            return hidden, (hidden,) * self.skip_count
        if self.returns == "encoder+hidden":
            return encoder, hidden
        return hidden


def stack_blocks(model: torch.nn.Module, adapter: ModelAdapter) -> list[tuple[BlockGroup, torch.nn.Module]]:
    """(group, block) of every block of the stack, in forward order."""
    return [(group, block) for group, _, block in adapter.grouped(model)]


def install_stack_hooks(model: torch.nn.Module, adapter: ModelAdapter, policy: StackPolicy,
                        states: BranchStates, handle: CacheHandle, method: str) -> None:
    """Hook every block of ``model``'s stack for ``policy``; ``handle`` takes them off again."""
    blocks = stack_blocks(model, adapter)
    name = hook_name(method)
    for i, (group, block) in enumerate(blocks):
        hook = StackBlockHook(states, policy, group.returns, first=i == 0, last=i == len(blocks) - 1)
        handle.register(block, hook, name)


def load_stack_calibration(model: torch.nn.Module, method: str, given: str) -> Calibration:
    """``method``'s calibration for ``model`` (see ``calibration.load_for``), refused when it
    was recorded on another model class."""
    calibration = load_for(model, method, given)
    recorded_on = calibration.meta.get("denoiser")
    if recorded_on != type(model).__name__:
        raise ValueError(f"the {method} calibration given was recorded on a {recorded_on}, not on this "
                         f"{type(model).__name__}: run `sdinfer calibrate --method {method}` for this model")
    return calibration
