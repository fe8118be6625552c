"""AsyncDiff: the denoiser split into sequential components, run concurrently across steps.

Chen et al., "AsyncDiff: Parallelizing Diffusion Models by Asynchronous Denoising", NeurIPS
2024, Sec. 3.2 (asynchronous denoising) and 3.3 (stride denoising).  The denoiser's blocks (the
model adapter's block list, in forward order: a UNet's down, mid and up blocks; a DiT's
transformer blocks) are cut into N contiguous components of about equal compute (their MACs,
counted on the first call), component k on rank k.  After ``warmup_steps`` synchronous steps
(every rank runs the whole model, exact), component k at step t takes as input the output of
component k - 1 at step t - 1: the components no longer wait for each other, so the N ranks run
one step in about 1/N of the time.  A rank runs its own blocks; every other block returns that
block's output of the previous model call, as its owner sent it (and during warm-up, as the rank
computed it).

Stride 2 (N components on N + 1 ranks): after warm-up the steps go in pairs.  In the first step
of a pair (a compute step, at timestep t) ranks 0 .. N - 1 run their components at the *next*
step's timestep t' (each fed, as with stride 1, by its predecessor's stored output), while rank
N runs the last component at t; rank N's model output is the step's.  The second step of the
pair calls no block: every rank has the components' outputs at t' (sent during the compute
step), and the last component's, finished by the model's own final layers at t', is that step's
output.  So each round of N + 1 parallel component runs advances two steps.  (The reference code
counts pairs from model call 1 whatever the warm-up; here from the first step after warm-up, the
same for its default warm-up of 1.)  Stride 2 needs the next step's timestep from sdinfer's
sampling loop, and one model call per step.

Communicated per model call after warm-up (broadcasts from each block's owner; a broadcast of
E bytes sends E (R - 1) on R ranks):

- each block output another rank reads: the last block of every component but the last (its
  successor's input), and a UNet down block's output (hidden and skip features) where a block
  after the down blocks (mid or up) belongs to another rank; with stride 2 also the last block
  (the second step's output); started asynchronously as the block finishes (the receivers post
  theirs as they pass the block) and waited for at the next model call, so it overlaps the rest
  of this call and the sampler's update;
- the model output, from the last component's owner (stride 2: rank N), waited for at once (the
  sampler needs it).

So with O_b the bytes of block b's output and X the exchanged blocks, a stride-1 step sends
(sum_{b in X} O_b + O_model) (N - 1) bytes in all, and a stride-2 pair of steps
(sum_{b in X} O_b + O_model) N.  Exact when every step is a warm-up step (max abs error
against one device <= 1e-5, tested); afterwards approximate, like the paper (PSNR against one
device in BENCHMARKS.md).  Not implemented: time shifting; the split is by measured MACs rather
than the paper's hand-written split points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from torch.utils.flop_counter import FlopCounterMode

from ..cache.base import (BranchStates, CacheHandle, hidden_states_of, hook_name, map_tensors, require_step,
                          tensors_of, timestep_index)
from ..context import StepContext
from ..errors import UserError
from ..models.adapters import adapter_for
from .comm import Communicator, Pending


@dataclass
class AsyncDiffConfig:
    """``asyncdiff``: one component of the denoiser per rank, each a step behind its predecessor;
    ``stride=2``: one rank more, which runs the last component while the others compute the next
    step."""

    warmup_steps: int = 1   # AsyncDiff's default warm_up
    stride: int = 1
    exact = False   # stale activations: caching them would reuse features that are stale already (as xDiT)

    def __post_init__(self):
        if self.warmup_steps < 1:
            raise ValueError(f"asyncdiff warmup_steps={self.warmup_steps}: at least 1 synchronous step is "
                             "needed before a component can read its predecessor's previous output")
        if self.stride not in (1, 2):
            raise ValueError(f"asyncdiff stride={self.stride}: the paper's strides are 1 and 2; use one of them")

    def components(self, size: int) -> int:
        """Components of the denoiser on ``size`` ranks (stride 2: one rank runs no own component)."""
        return size - (self.stride - 1)

    def check_world_size(self, size: int) -> None:
        if self.components(size) < 2:
            extra = " and one rank more for the last" if self.stride == 2 else ""
            raise ValueError(f"asyncdiff (stride {self.stride}) runs at least 2 components, one per rank{extra}: "
                             f"it needs a world size of {1 + self.stride} or more, got {size}")


def balanced_split(costs: list[int], parts: int) -> list[int]:
    """The owner (0..parts-1) of each item, cutting ``costs`` into ``parts`` contiguous runs whose
    largest sum is as small as it can be (the linear partition problem, solved exactly)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest run for the first i items in k runs; cut[k][i]: its last cut
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    owners, i = [0] * n, n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        owners[j:i] = [k - 1] * (i - j)
        i = j
    return owners


@dataclass
class Plan:
    """Who runs which block, and which block outputs other ranks read."""

    owners: list[int]
    exchanged: set[int]

    @property
    def last_owner(self) -> int:
        return self.owners[-1]


def make_plan(costs: list[int], gives_skips: list[bool], components: int, stride: int = 1) -> Plan:
    """``gives_skips[b]``: block b's output carries skip features that the blocks after the last
    such block (a UNet's mid and up blocks) read.  Stride 2 also sends the last block's output
    (every rank finishes the second step of a pair from it)."""
    owners = balanced_split(costs, components)
    last_giver = max((b for b, gives in enumerate(gives_skips) if gives), default=len(owners))
    readers = set(owners[last_giver + 1:])
    exchanged = {b for b in range(len(owners) - 1) if owners[b + 1] != owners[b]}
    exchanged |= {b for b, gives in enumerate(gives_skips) if gives and readers - {owners[b]}}
    if stride == 2:
        exchanged.add(len(owners) - 1)
    return Plan(owners, exchanged)


@dataclass
class BranchState:
    """One guidance branch's outputs of the previous call, by block, and receives under way."""

    outputs: dict[int, object] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    macs: dict[int, int] = field(default_factory=dict)

    def settle(self) -> None:
        for pending in self.pending.values():
            pending.wait()
        self.pending.clear()


class Shared:
    """What the model hook and the block hooks of one application share."""

    def __init__(self, config: AsyncDiffConfig, comm: Communicator, gives_skips: list[bool]):
        self.config, self.comm, self.gives_skips = config, comm, gives_skips
        self.states: BranchStates[BranchState] = BranchStates(BranchState)
        self.plans: dict[tuple, Plan] = {}   # by the shape of the model's input
        self.key: tuple = ()
        self.ctx: StepContext | None = None

    def begin(self, ctx: StepContext, sample: torch.Tensor) -> BranchState:
        if ctx.generation != self.states.generation:
            for state in self.states.states.values():
                state.settle()
        self.ctx, self.key = ctx, tuple(sample.shape)
        return self.states.get(ctx)

    @property
    def state(self) -> BranchState:
        return self.states.get(self.ctx)

    @property
    def warming(self) -> bool:
        return self.ctx.step_index < self.config.warmup_steps or self.key not in self.plans

    @property
    def reusing(self) -> bool:
        """The second step of a stride-2 pair: no block runs."""
        return self.config.stride == 2 and (self.ctx.step_index - self.config.warmup_steps) % 2 == 1

    @property
    def extra_rank(self) -> int | None:
        """Stride 2: the rank that runs the last component at the step's own timestep."""
        return self.comm.size - 1 if self.config.stride == 2 else None

    @property
    def output_rank(self) -> int:
        """Whose model output is the step's on a step that runs blocks."""
        return self.plan.last_owner if self.config.stride == 1 else self.extra_rank

    def runs(self, block: int) -> bool:
        owner, rank = self.plan.owners[block], self.comm.rank
        if self.reusing:
            return False
        return owner == rank or (rank == self.extra_rank and owner == self.plan.last_owner)

    @property
    def plan(self) -> Plan:
        return self.plans[self.key]


def _flat(output) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors_of(output)])


def _empty_like_flat(output) -> torch.Tensor:
    tensors = tensors_of(output)
    return tensors[0].new_empty(sum(t.numel() for t in tensors))


def _unflat(flat: torch.Tensor, like):
    sizes = [t.numel() for t in tensors_of(like)]
    parts = flat.split(sizes)
    return map_tensors(lambda i, t: parts[i].view_as(t), like)


class AsyncBlockHook(ModelHook):
    """On block ``index``: run it (own block, or warm-up) or stand in its previous output."""

    def __init__(self, index: int, shared: Shared):
        super().__init__()
        self.index, self.shared = index, shared

    def new_forward(self, module, *args, **kwargs):
        shared, i = self.shared, self.index
        state = shared.state
        if shared.warming:
            if shared.key not in shared.plans:
                with FlopCounterMode(display=False) as counter:
                    out = self.fn_ref.original_forward(*args, **kwargs)
                state.macs[i] = int(counter.get_total_flops() // 2)
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
            state.outputs[i] = out
            return out
        plan, comm = shared.plan, shared.comm
        owner = plan.owners[i]
        if i in state.pending:   # what the owner sent at the previous call
            received = state.pending.pop(i).wait()
            if owner != comm.rank:
                state.outputs[i] = _unflat(received, state.outputs[i])
        if shared.runs(i):
            state.outputs[i] = self.fn_ref.original_forward(*args, **kwargs)
        out = state.outputs[i]
        if i in plan.exchanged and not shared.ctx.is_last and not shared.reusing:
            sent = _flat(out) if owner == comm.rank else _empty_like_flat(out)
            state.pending[i] = comm.start_broadcast(sent, owner)
        return out


class AsyncModelHook(ModelHook):
    """On the denoiser: start the call's state; after warm-up, every rank takes the step's output
    from the rank that finished it; after the first call, cut the blocks into components."""

    def __init__(self, shared: Shared):
        super().__init__()
        self.shared = shared
        self.t_index: int | None = None
        self.seen: tuple | None = None

    def new_forward(self, module, *args, **kwargs):
        shared = self.shared
        ctx = require_step()
        state = shared.begin(ctx, hidden_states_of(args, kwargs))
        warming = shared.warming
        if not warming and shared.config.stride == 2:
            self._check_one_call_per_step(ctx)
            if not shared.reusing and shared.comm.rank != shared.extra_rank and not ctx.is_last:
                args, kwargs = self._at_next_timestep(ctx, args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if warming:
            if shared.key not in shared.plans:
                costs = [state.macs[i] for i in range(len(shared.gives_skips))]
                shared.plans[shared.key] = make_plan(costs, shared.gives_skips,
                                                     shared.config.components(shared.comm.size),
                                                     shared.config.stride)
            return out
        if shared.reusing:   # every rank finished the step alike from the blocks' sent outputs
            return out
        source = shared.output_rank
        return map_tensors(lambda _, t: shared.comm.broadcast(t, source), out)

    def _check_one_call_per_step(self, ctx: StepContext) -> None:
        call = (ctx.generation, ctx.step_index, ctx.branch)
        if call == self.seen:
            raise UserError("asyncdiff stride 2 pairs the steps, one model call each, and this sampler "
                            "calls the model more than once a step; use a one-call sampler (ddim, "
                            "dpm-solver++, unipc, euler) or stride=1")
        self.seen = call

    def _at_next_timestep(self, ctx: StepContext, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if ctx.next_model_t is None:
            raise UserError("asyncdiff stride 2 computes the next step's components ahead, and this "
                            "loop does not say the next timestep (a stock diffusers pipeline); run it "
                            "through sdinfer's Pipeline or use stride=1")
        if self.t_index is None:
            self.t_index = timestep_index(self.fn_ref.original_forward)
        if "timestep" in kwargs or len(args) <= self.t_index:
            kwargs = {**kwargs, "timestep": _replaced(kwargs.get("timestep"), ctx.next_model_t)}
        else:
            args = (*args[:self.t_index], _replaced(args[self.t_index], ctx.next_model_t),
                    *args[self.t_index + 1:])
        return args, kwargs


def _replaced(timestep, value: float):
    if isinstance(timestep, torch.Tensor):
        return torch.full_like(timestep, value)
    return value


def apply_asyncdiff(model: torch.nn.Module, config: AsyncDiffConfig, handle: CacheHandle,
                    comm: Communicator) -> None:
    adapter = adapter_for(model)
    grouped = list(adapter.grouped(model))
    components = config.components(comm.size)
    if len(grouped) < components:
        raise ValueError(f"asyncdiff gives each of {components} components at least one block, and "
                         f"{type(model).__name__} has {len(grouped)}; use a world size of at most "
                         f"{len(grouped) + config.stride - 1}")
    shared = Shared(config, comm, [group.returns == "hidden+skips" for group, _, _ in grouped])
    handle.state = shared
    name = hook_name("asyncdiff")
    handle.register(model, AsyncModelHook(shared), name)
    for index, (_, _, block) in enumerate(grouped):
        handle.register(block, AsyncBlockHook(index, shared), name)
