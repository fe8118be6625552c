"""The cache framework: hooks on the blocks a model adapter names, reading the step context.

Each cache method is one file: a config dataclass, a state with ``reset``, its hooks and
one ``apply`` function.  Hooks go through diffusers' ``HookRegistry`` (the mechanism of
diffusers' own caches): they need no edit to the model's code, stack with diffusers' hooks
and come off cleanly (``CacheHandle.remove``).  Only the data-dependent decision (compute
or reuse) is plain Python; the tensors' path is the model's own.

Step context: inside sdinfer's loop the sampler sets it (``context.current_step``); inside a
stock diffusers pipeline the ``StepTracker`` hook on the denoiser infers it from the
timesteps of its calls: a new generation when the timestep rises (or after the last of the
scheduler's steps), a new step when it falls, and a further call at the same timestep is
another guidance branch (pipelines that run cond and uncond as separate calls).

State is kept per generation and per branch (``BranchStates``): a new request starts clean
whatever its step count, and cond / uncond calls never read each other's features.

Under a parallel strategy that splits a call's tensors over ranks (guidance halves, token
shards), a data-dependent decision must come out the same on every rank, or one rank would
skip a block whose collectives the others enter: ``relative_change`` sums its two norms over
the ranks while ``shared_decisions(reduce)`` is active (the strategy's hook on the denoiser
sets it), so every rank decides on the whole tensor, as one device would.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Generic, TypeVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput

from ..context import StepContext, current_step, step_context

STEP_TRACKER = "sdinfer_step_tracker"
DIFFUSERS_HALVES = ("uncond", "cond")   # how diffusers' text-to-image pipelines batch guidance
_inferred_generations = itertools.count(start=-1, step=-1)  # sdinfer's own loop counts up from 0
_decision_reduce: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = \
    contextvars.ContextVar("sdinfer_decision_reduce", default=None)


class CacheConfig:
    """Base of the cache methods' config dataclasses: what every method declares beside its knobs."""

    # the exact parallel strategies (those that compute on every rank what one device would: CFG
    # parallel, Ulysses, Ring) the cache may run under, its data-dependent decisions shared over the
    # ranks (``shared_decisions``): True for all, a tuple of strategy names for those only, False for
    # none (T-GATE, which changes the batch mid-run)
    exact_parallel: ClassVar[bool | tuple[str, ...]] = True


def whole_number(method: str, knob: str, value, least: int, note: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``method``'s ``knob``: a whole number >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or value < least:
        raise ValueError(f"{method} {knob} must be a whole number >= {least}{note}, got {value}")
    return int(value)


@contextlib.contextmanager
def shared_decisions(reduce: Callable[[torch.Tensor], torch.Tensor]):
    """Inside: ``relative_change`` sums its norms with ``reduce`` (an all-reduce over the ranks)."""
    token = _decision_reduce.set(reduce)
    try:
        yield
    finally:
        _decision_reduce.reset(token)


@torch.compiler.disable
def relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    """sum|current - reference| / sum|reference| (the relative L1 change of the whole tensor),
    summed over the ranks of a parallel strategy that splits it (``shared_decisions``)."""
    current, reference = current.float(), reference.float()   # half-precision sums lose digits
    sums = torch.stack([(current - reference).abs().sum(), reference.abs().sum()])
    sums = sums if sums.device.type == "mps" else sums.double()   # MPS has no float64
    reduce = _decision_reduce.get()
    if reduce is not None:
        sums = reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1e-12))


def timestep_index(forward) -> int:
    """Position of the ``timestep`` argument in a model's forward (diffusers' name for it)."""
    try:
        names = [n for n in inspect.signature(forward).parameters if n != "self"]
    except (TypeError, ValueError):
        return 1
    return names.index("timestep") if "timestep" in names else 1


def _timestep_of(args: tuple, kwargs: dict, index: int) -> float | None:
    t = kwargs.get("timestep", args[index] if len(args) > index else None)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return float(t)


@torch.compiler.disable
def _repeated_twice(sample) -> bool:
    if not isinstance(sample, torch.Tensor) or sample.ndim == 0 or sample.shape[0] % 2:
        return False
    first, second = sample.chunk(2)
    return bool(torch.equal(first, second))


class StepTracker(ModelHook):
    """Sets the step context around each call of the denoiser when no sdinfer loop did.

    A call is taken as a batched guidance call (``guidance_halves`` in diffusers' order) where
    ``guided()`` says the pipeline guides (its ``do_classifier_free_guidance``) and the call's
    sample is one batch repeated twice; many pipelines that guide call each branch separately."""

    def __init__(self, num_steps: Callable[[], int] | None = None, guided: Callable[[], bool] | None = None):
        super().__init__()
        self.num_steps = num_steps
        self.guided = guided
        self.users = 0   # caches relying on this tracker; the last to go removes it
        self.t_index: int | None = None
        self.reset()

    def reset(self) -> None:
        self.last_t: float | None = None
        self.step = 0
        self.call = 0
        self.generation = 0

    def reset_state(self, module):
        self.reset()
        return module

    def infer(self, t: float, sample: torch.Tensor | None = None) -> StepContext:
        total = self.num_steps() if self.num_steps is not None else 0
        finished = total > 0 and self.step >= total - 1
        if self.last_t is None or t > self.last_t or (t == self.last_t and finished and self.call > 0):
            self.generation, self.step, self.call = next(_inferred_generations), 0, 0
        elif t < self.last_t:
            self.step, self.call = self.step + 1, 0
        else:
            self.call += 1
        self.last_t = t
        batched = self.call == 0 and self.guided is not None and self.guided() and _repeated_twice(sample)
        # num_steps 0: unknown (a bare model called outside any pipeline)
        return StepContext(step_index=self.step, num_steps=total, t=float("nan"),
                           model_t=t, branch="both" if self.call == 0 else f"call{self.call}",
                           generation=self.generation, guidance_halves=DIFFUSERS_HALVES if batched else None)

    def new_forward(self, module, *args, **kwargs):
        if current_step() is not None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.t_index is None:
            self.t_index = timestep_index(self.fn_ref.original_forward)
        t = _timestep_of(args, kwargs, self.t_index)
        if t is None:
            raise ValueError(f"a cached {type(module).__name__} needs the timestep of each call "
                             "(as its second argument or timestep=...) to know the step")
        with step_context(self.infer(t, hidden_states_of(args, kwargs))):
            return self.fn_ref.original_forward(*args, **kwargs)


def installed_hooks(module: torch.nn.Module) -> dict:
    """The hooks installed on ``module`` itself, by name (empty where none are)."""
    registry = getattr(module, "_diffusers_hook", None)
    return dict(getattr(registry, "hooks", None) or {})


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` off ``module``, wherever it sits in the module's stack of hooks.

    diffusers' public ``HookRegistry.remove_hook`` alone would stop every hook above the removed
    one (it relinks the next hook by its ``forward``, for a ``new_forward`` hook the hook itself),
    so this reads the registry's private ``_hook_order`` / ``_fn_refs`` to relink it; both the
    relinking bug and the private state are pinned by ``tests/test_hook_removal.py``."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    order, refs = registry._hook_order, registry._fn_refs
    if name not in order:
        return
    index = order.index(name)
    above = refs[index + 1] if index + 1 < len(order) else None
    wrapper = None if above is None or above.original_forward is None else above.forward
    registry.remove_hook(name, recurse=False)
    if wrapper is not None:
        # diffusers relinks the hook above by its `forward`, which for a `new_forward` hook is
        # the hook itself: give it back and link the forward it wraps instead
        above.original_forward, above.forward = above.forward, wrapper


S = TypeVar("S")


class BranchStates(Generic[S]):
    """One state per guidance branch, all dropped when a new generation starts."""

    def __init__(self, factory: Callable[[], S]):
        self.factory = factory
        self.reset()

    def reset(self) -> None:
        self.generation: int | None = None
        self.states: dict[str, S] = {}

    def get(self, ctx: StepContext) -> S:
        if ctx.generation != self.generation:
            self.reset()
            self.generation = ctx.generation
        if ctx.branch not in self.states:
            self.states[ctx.branch] = self.factory()
        return self.states[ctx.branch]


def require_step() -> StepContext:
    ctx = current_step()
    if ctx is None:
        raise RuntimeError("a cache hook ran outside any step: install caches with sdinfer.accelerate, "
                           "which also tracks the steps of stock diffusers pipelines")
    return ctx


@dataclass
class CacheHandle:
    """What ``apply`` installed; ``remove()`` takes it all off again."""

    method: str
    hooks: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    states: list[BranchStates] = field(default_factory=list)
    tracked: torch.nn.Module | None = None
    # what else removal undoes (e.g. weights swapped into the model), run last to first
    undo: list[Callable[[], None]] = field(default_factory=list)

    def register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.hooks.append((module, name))

    def track_steps(self, model: torch.nn.Module, num_steps: Callable[[], int] | None = None,
                    guided: Callable[[], bool] | None = None) -> None:
        """Infer the step context on ``model``'s calls outside sdinfer's loop (shared by caches).
        The tracker stays the outermost hook, so hooks on the model itself see the step."""
        registry = HookRegistry.check_if_exists_or_initialize(model)
        tracker = registry.get_hook(STEP_TRACKER)
        if tracker is None:
            tracker = StepTracker(num_steps, guided)
        else:
            remove_hook(model, STEP_TRACKER)
            tracker.num_steps = tracker.num_steps or num_steps
            tracker.guided = tracker.guided or guided
        registry.register_hook(tracker, STEP_TRACKER)
        tracker.users += 1
        self.tracked = model

    def reset(self) -> None:
        for states in self.states:
            states.reset()

    def remove(self) -> None:
        for module, name in reversed(self.hooks):
            remove_hook(module, name)
        self.hooks.clear()
        if self.tracked is not None:
            registry = HookRegistry.check_if_exists_or_initialize(self.tracked)
            tracker = registry.get_hook(STEP_TRACKER)
            if tracker is not None:
                tracker.users -= 1
                if tracker.users <= 0:
                    remove_hook(self.tracked, STEP_TRACKER)
            self.tracked = None
        while self.undo:
            self.undo.pop()()
        self.reset()


_names = itertools.count()


def hook_name(method: str) -> str:
    """A registry name unique to one application of a method."""
    return f"sdinfer_{method}_{next(_names)}"


class StepState:
    """Per-branch state of a cache on a fixed schedule: the outputs kept from the last fully
    computed step, and whether the current step computes (decided once per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.outputs: dict = {}
        self.step: int | None = None
        self.computing = True

    def keep(self, key: str, output) -> None:
        """Keep a computed output (subclasses may keep more, e.g. a forecast's history)."""
        self.outputs[key] = output

    def recall(self, key: str):
        """What stands in for ``key``'s output on this step: here the kept one."""
        return self.outputs[key]

    def decide(self, ctx: StepContext, full: Callable[[StepContext], bool]) -> bool:
        if self.step != ctx.step_index:
            self.step = ctx.step_index
            self.computing = not self.outputs or full(ctx)
        return self.computing


class ScheduleController:
    """The shared decision of one applied cache: per branch, compute or reuse this step."""

    def __init__(self, full: Callable[[StepContext], bool], state: Callable[[], StepState] = StepState):
        self.full = full
        self.states = BranchStates(state)

    def state(self) -> tuple[StepState, bool]:
        ctx = require_step()
        state = self.states.get(ctx)
        return state, state.decide(ctx, self.full)


class ScheduledHook(ModelHook):
    """A hook of a fixed-schedule cache: on computing steps the module runs and ``computed``
    may keep its output; on the others ``reuse`` answers without running it."""

    def __init__(self, controller: ScheduleController):
        super().__init__()
        self.controller = controller

    def new_forward(self, module, *args, **kwargs):
        state, computing = self.controller.state()
        if computing:
            return self.computed(state, self.fn_ref.original_forward(*args, **kwargs))
        return self.reuse(state, args, kwargs)

    def computed(self, state: StepState, output):
        return output

    def reuse(self, state: StepState, args: tuple, kwargs: dict):
        raise NotImplementedError


def hidden_states_of(args: tuple, kwargs: dict):
    """The sample of a block's or model's call (diffusers' UNets name it ``sample``)."""
    return kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))


class LayerPlanState:
    """Per-branch state of a per-layer cache: each layer's kept output and the step it was computed at."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.outputs: dict[int, object] = {}
        self.computed_at: dict[int, int] = {}


class PlannedLayerHook(ModelHook):
    """A layer block of a cache that plans each layer's steps (Block Caching, Learning-to-Cache).

    Where ``computes(ctx, index)`` says so, or where nothing is kept yet, the layer runs and its
    output is kept; otherwise the kept output stands in, passed through ``adjust(kept,
    computed_at, ctx)`` where one is given."""

    def __init__(self, states: BranchStates[LayerPlanState], computes: Callable[[StepContext, int], bool],
                 index: int, adjust: Callable[[object, int, StepContext], object] | None = None):
        super().__init__()
        self.states, self.computes, self.index, self.adjust = states, computes, index, adjust

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        state = self.states.get(ctx)
        if self.index in state.outputs and not self.computes(ctx, self.index):
            kept = state.outputs[self.index]
            return kept if self.adjust is None else self.adjust(kept, state.computed_at[self.index], ctx)
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.outputs[self.index] = output
        state.computed_at[self.index] = ctx.step_index
        return output


def tensors_of(output) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists or dicts of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []


def map_tensors(fn: Callable[[int, torch.Tensor], torch.Tensor], output):
    """``output`` with its i-th tensor ``t`` (in ``tensors_of`` order) replaced by ``fn(i, t)``."""
    counter = itertools.count()

    def walk(item):
        if isinstance(item, torch.Tensor):
            return fn(next(counter), item)
        if isinstance(item, (tuple, list)):
            return type(item)(walk(x) for x in item)
        if isinstance(item, BaseOutput):   # a model's output with return_dict=True
            return type(item)(**{key: walk(value) for key, value in item.items()})
        if isinstance(item, dict):
            return {key: walk(value) for key, value in item.items()}
        return item

    return walk(output)
