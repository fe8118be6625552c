"""Learning-to-Cache (Ma, Fang, Mi & Wang, "Learning-to-Cache: Accelerating Diffusion Transformer
via Layer Caching", NeurIPS 2024).

Which layers may reuse their output of the previous step is learned.  As in the paper, steps
alternate: the even steps (0, 2, ...) compute every layer, and on each odd step (a *cache step*)
every layer either computes or reuses its output of the step before, so a reuse is always one
step old.  A router holds one logit per cache step t and layer l, beta_{t,l} = sigmoid(logit).
Training (the paper's relaxation): on cache step t each layer's output becomes
beta * (its fresh output) + (1 - beta) * (its output at step t - 1), and with the model frozen only
the router is trained, step by step (Adam on the logits, kept in [-5, 5]), to minimize
    ||model_beta(x_t) - model(x_t)||^2 / ||model(x_t)||^2 + lambda * mean_l(beta_{t,l}),
the error against the uncached model's output (relative, so one lambda fits every model) plus
the L1 push towards reuse.  As in the paper's training, x_t and the step t - 1 layer outputs come
from the uncached model: here its own sampling trajectories on a batch of calibration prompts.
``sdinfer calibrate --method l2c`` learns the router and saves its logits.

Cutting to a compute budget needs the layer-steps in order of need, across steps; one lambda's
betas saturate near 0 and 1 and lose that order.  So each step's router is trained along a
regularization path (lambda = 1e-4, 1e-3, 1e-2, 1e-1, each warm-started from the last, all kept),
and a layer-step's need is its beta averaged over the path: a layer that stays computed under a
stronger push towards reuse ranks higher.  Inference keeps the ``budget`` (a fraction of the cache
steps' layer-steps) with the highest need and lets the others reuse: the paper's straight-through
threshold on beta, placed where the budget is met.  Routers are specific to the step count, as in
the paper: a run with another count is an error that names the calibrated count.

Layers (the adapter's ``layer_blocks``): on transformers the attention and MLP sub-layers of each
block (the paper's two routers per block; the block still applies its fresh gates); on UNets, which
the paper does not treat, the analogous units: each resnet and each attention block.

Cached: each layer's output on the step before a cache step.  Refreshed: on every even step.
``budget=1`` computes every layer on every step and is exact; ``budget=0`` reuses every layer on
every cache step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..context import StepContext, current_step
from ..errors import UserError
from .base import (BranchStates, CacheConfig, CacheHandle, LayerPlanState, PlannedLayerHook, hook_name,
                   map_tensors, tensors_of)
from .block_caching import check_units, layer_blocks
from .calibration import Calibration, CalibrationRun, load_for, register_calibrator

METHOD = "l2c"
# lambda, the mean beta's weight against the relative error: a regularization path, warm-started
L1_WEIGHTS = (1e-4, 1e-3, 1e-2, 1e-1)
ITERATIONS = 3          # optimizer steps per lambda (each cache step's router is its own problem)
LEARNING_RATE = 0.4
LOGIT_RANGE = 5.0       # logits are kept in [-5, 5], as in the paper's training
ROUTER_PROMPTS = 2      # the router learns on one batch of this many calibration prompts (CPU minutes)


@dataclass
class LearningToCacheConfig(CacheConfig):
    budget: float = 0.35
    calibration: str = ""   # a calibration file; empty: the one beside the model's weights

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 <= self.budget <= 1:
            raise ValueError(f"l2c budget must be the fraction of the cache steps' layers computed, in [0, 1], "
                             f"got {self.budget!r}")
        self.budget = float(self.budget)


def is_cache_step(step: int) -> bool:
    return step % 2 == 1


def computed_layers(logits: torch.Tensor, budget: float) -> torch.Tensor:
    """(steps, layers) booleans from (lambdas, steps, layers) router logits: every layer on the even
    steps, and on the odd ones the ``budget`` of the layer-steps with the highest beta over the path."""
    beta = torch.sigmoid(logits).mean(0)
    cache = torch.tensor([is_cache_step(s) for s in range(beta.shape[0])])
    plan = ~cache[:, None].expand_as(beta).clone()
    candidates = beta[cache].flatten()
    order = torch.argsort(candidates, descending=True, stable=True)[:round(budget * candidates.numel())]
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    chosen[order] = True
    plan[cache] = chosen.view(-1, beta.shape[1])
    return plan


class RouterPlan:
    def __init__(self, calibration: Calibration, budget: float):
        self.steps = int(calibration.meta["steps"])
        self.plan = computed_layers(calibration.tensors["logits"].float(), budget).tolist()

    def computes(self, ctx: StepContext, index: int) -> bool:
        if ctx.num_steps not in (0, self.steps) or ctx.step_index >= self.steps:   # 0: unknown
            steps = ctx.num_steps or f"more than {self.steps}"
            raise UserError(f"the l2c router was learned for {self.steps} steps and this run has {steps}; "
                            f"run {self.steps} steps, or learn a router for the count with `sdinfer calibrate "
                            f"--method l2c --steps N --out FILE` and pass l2c:calibration=FILE")
        return self.plan[ctx.step_index][index]


def apply_learning_to_cache(model: torch.nn.Module, config: LearningToCacheConfig, handle: CacheHandle) -> None:
    blocks = layer_blocks(model, METHOD)
    calibration = load_for(model, METHOD, config.calibration)
    check_units(calibration, [name for name, _ in blocks], model, METHOD)
    plan = RouterPlan(calibration, config.budget)
    states = BranchStates(LayerPlanState)
    handle.states.append(states)
    name = hook_name(METHOD)
    for index, (_, module) in enumerate(blocks):
        handle.register(module, PlannedLayerHook(states, plan.computes, index), name)


# ---- calibration: learning the router ------------------------------------------------------
class RouterHooks:
    """Forward hooks on the layers: with no ``beta`` they keep each layer's fresh output (the
    uncached model); with one they mix it with ``previous`` (the router's relaxation)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.beta: torch.Tensor | None = None
        self.previous: dict[int, list[torch.Tensor]] = {}
        self.fresh: dict[int, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, index: int):
        def hook(module, args, output):
            if self.beta is None:
                self.fresh[index] = [t.detach() for t in tensors_of(output)]
                return None
            beta, previous = self.beta[index], self.previous[index]
            return map_tensors(lambda i, t: beta * t + (1 - beta) * previous[i], output)
        return hook


def record_calls(run: CalibrationRun) -> list[list[tuple[tuple, dict]]]:
    """The denoiser's inputs at every step of every calibration generation."""
    net = run.pipe.model.denoiser
    calls: dict[int, list] = {}

    def keep(module, args, kwargs):
        detached = map_tensors(lambda _, t: t.detach().clone(), (args, kwargs))
        calls.setdefault(current_step().generation, []).append(detached)

    handle = net.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        run.generate()
    finally:
        handle.remove()
    if any(len(steps) != run.steps for steps in calls.values()):
        raise ValueError(f"l2c calibration needs one model call per step; a generation of {run.steps} steps "
                         f"made {[len(s) for s in calls.values()]}")
    return list(calls.values())


def _output(net: torch.nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return tensors_of(net(*args, **kwargs))[0]


def learn_router(net: torch.nn.Module, modules: list[torch.nn.Module],
                 generations: list[list[tuple[tuple, dict]]]) -> torch.Tensor:
    """(lambdas, steps, layers) router logits, step by step on the uncached trajectories."""
    steps = len(generations[0])
    logits = torch.full((len(L1_WEIGHTS), steps, len(modules)), LOGIT_RANGE)
    hooks = RouterHooks(modules)
    trainable = [p for p in net.parameters() if p.requires_grad]
    net.requires_grad_(False)
    try:
        previous: list[dict] = []
        for step in range(steps):
            targets, fresh = [], []
            with torch.no_grad():
                for calls in generations:
                    targets.append(_output(net, calls[step]))
                    fresh.append(dict(hooks.fresh))
            if is_cache_step(step):
                logits[:, step] = _learn_step(net, hooks, [calls[step] for calls in generations], targets, previous)
            previous = fresh
    finally:
        hooks.remove()
        for p in trainable:
            p.requires_grad_(True)
    return logits


def _learn_step(net: torch.nn.Module, hooks: RouterHooks, calls: list, targets: list[torch.Tensor],
                previous: list[dict]) -> torch.Tensor:
    """One cache step's router: (lambdas, layers) logits, each lambda's warm-started from the last."""
    logit = torch.zeros(len(hooks.handles), requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=LEARNING_RATE)
    path = []
    try:
        for l1_weight in L1_WEIGHTS:
            for _ in range(ITERATIONS):
                optimizer.zero_grad()
                for call, target, before in zip(calls, targets, previous):
                    hooks.beta, hooks.previous = torch.sigmoid(logit), before
                    with torch.enable_grad():
                        output = _output(net, call)
                        error = (output - target).square().mean() / target.square().mean().clamp(min=1e-12)
                        ((error + l1_weight * hooks.beta.mean()) / len(calls)).backward()
                optimizer.step()
                with torch.no_grad():
                    logit.clamp_(-LOGIT_RANGE, LOGIT_RANGE)
            path.append(logit.detach().clone())
    finally:
        hooks.beta = None
    return torch.stack(path)


def calibrate_learning_to_cache(run: CalibrationRun) -> Calibration:
    net = run.pipe.model.denoiser
    blocks = layer_blocks(net, METHOD)
    run = dataclasses.replace(run, prompts=run.prompts[:ROUTER_PROMPTS])
    generations = record_calls(run)
    logits = learn_router(net, [m for _, m in blocks], generations)
    meta = {"units": [name for name, _ in blocks], "steps": run.steps, "sampler": run.sampler,
            "guidance_scale": run.guidance_scale, "prompts": len(run.prompts), "l1_weights": list(L1_WEIGHTS),
            "iterations": ITERATIONS}
    return Calibration(METHOD, {"logits": logits}, meta)


register_calibrator(METHOD, calibrate_learning_to_cache)
