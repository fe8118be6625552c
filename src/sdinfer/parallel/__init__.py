"""Multi-device inference on torch.distributed: strategies wrapped around the same model.

Each strategy is one file: a config dataclass (its string form ``NAME[:key=value,...]``,
parsed like the caches' specs), hooks on the modules the model adapter names, and one
``apply_<strategy>(model, config, handle, comm)`` function; all collectives go through a
``Communicator``, which counts the bytes each rank sends.

    from sdinfer.parallel import apply, launch
    launch.init_process_group()              # under torchrun, or ranks of launch.launch_local
    handle = apply(pipe, "ulysses")          # every rank: the same pipeline, the same call
    image = pipe(prompt)                     # the same image on every rank
    handle.remove()

Strategies: ``cfg`` (guidance branches on two ranks), ``ulysses`` and ``ring`` (sequence
parallelism of a DiT's image tokens), ``distrifusion`` (row patches of a UNet's latent, stale
neighbours after warm-up), ``asyncdiff`` (the denoiser's components on the ranks,
each a step behind its predecessor), ``pipefusion`` (a DiT's blocks in pipeline stages, image
patches pipelined through them over stale K/V).  Launching, failure handling: ``launch.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from .. import cache
from ..cache.base import STEP_TRACKER, CacheHandle, hook_name, installed_hooks, shared_decisions
from ..errors import UserError
from ..specs import parse_config
from .asyncdiff import AsyncDiffConfig, apply_asyncdiff
from .cfg_parallel import CFGParallelConfig, apply_cfg_parallel
from .comm import Communicator, PeerFailure
from .distrifusion import DistriFusionConfig, apply_distrifusion
from .pipefusion import PipeFusionConfig, apply_pipefusion
from .sequence_parallel import RingConfig, UlyssesConfig, apply_ring, apply_ulysses

STRATEGIES: dict[str, tuple[type, Callable]] = {
    "cfg": (CFGParallelConfig, apply_cfg_parallel),
    "ulysses": (UlyssesConfig, apply_ulysses),
    "ring": (RingConfig, apply_ring),
    "distrifusion": (DistriFusionConfig, apply_distrifusion),
    "asyncdiff": (AsyncDiffConfig, apply_asyncdiff),
    "pipefusion": (PipeFusionConfig, apply_pipefusion),
}


class StrategyHook(ModelHook):
    """On the denoiser, outermost of the strategy's hooks: names the strategy installed, and
    makes the caches' data-dependent decisions sum over the ranks (``shared_decisions``)."""

    def __init__(self, strategy: str, comm: Communicator):
        super().__init__()
        self.strategy, self.comm = strategy, comm

    def new_forward(self, module, *args, **kwargs):
        with shared_decisions(self.comm.all_reduce):
            return self.fn_ref.original_forward(*args, **kwargs)


def strategy_on(model: torch.nn.Module) -> str | None:
    """The parallel strategy installed on ``model``, if any."""
    return next((h.strategy for h in installed_hooks(model).values() if isinstance(h, StrategyHook)), None)


def caches_under(strategy: str) -> tuple[str, ...]:
    """The caches that may run under ``strategy`` (``cfg+NAME``: under both; installed after it, with
    sdinfer.accelerate): under an exact strategy (its config's ``exact``) every cache whose config
    allows that strategy (``CacheConfig.exact_parallel``), data-dependent decisions made alike on every rank
    through ``shared_decisions``; under a stale one (DistriFusion, PipeFusion, AsyncDiff) none."""
    if not all(STRATEGIES[name][0].exact for name in strategy.split("+")):
        return ()
    return cache.exact_parallel_methods(strategy)


def cache_refusal(strategy: str, method: str) -> str | None:
    """Why cache ``method`` cannot run under ``strategy`` (``cfg+NAME``: under both), or None."""
    takes = caches_under(strategy)
    if method in takes:
        return None
    return (f"{method} cannot run under the {strategy} parallel strategy: "
            + (f"it takes {', '.join(takes)}" if takes else
               f"{strategy} computes with stale activations and takes no cache")
            + f"; drop the cache or use another strategy ({_exact_strategies()} take most caches)")


def _exact_strategies() -> str:
    names = [name for name, (config_cls, _) in STRATEGIES.items() if config_cls.exact]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def check_cache(model: torch.nn.Module, method: str) -> None:
    """Refuse cache ``method`` on ``model`` where its parallel strategy does not take it."""
    strategy = strategy_on(model)
    reason = cache_refusal(strategy, method) if strategy is not None else None
    if reason:
        raise UserError(reason)


@dataclass
class ParallelHandle(CacheHandle):
    """The hooks of one applied strategy (``remove()`` takes them off), its communicator, and
    what the strategy lets a caller inspect (``state``; e.g. AsyncDiff's split of the blocks)."""

    comm: Communicator | None = None
    state: object = None


@dataclass
class CFGCombinedConfig:
    """``cfg+NAME``: the guidance branches on two halves of the ranks (CFG parallel between
    rank r and rank r + N/2), strategy NAME over the N/2 ranks of each half (DistriFusion's
    split_batch, xDiT's cfg x sequence / patch parallel degrees)."""

    inner: object
    needs_guidance = True

    @property
    def exact(self) -> bool:
        return self.inner.exact

    def check_world_size(self, size: int) -> None:
        if size % 2 or size < 4:
            raise ValueError(f"cfg+{strategy_of(self.inner)} runs the two guidance branches on two halves of the "
                             f"ranks, each half running {strategy_of(self.inner)}: it needs an even world size of "
                             f"4 or more, got {size}")
        self.inner.check_world_size(size // 2)


def parse_spec(spec: str):
    """A strategy's config from ``NAME[:key=value,...]``, or ``cfg+NAME[:...]`` for CFG parallel
    combined with another strategy."""
    parts = [part.strip() for part in spec.split("+")]
    if len(parts) > 2 or (len(parts) == 2 and parts[0].partition(":")[0].strip().lower() != "cfg"):
        raise UserError(f"parallel spec {spec!r}: the one combination is cfg+NAME (CFG parallel over two "
                        f"halves of the ranks, NAME within each half), NAME one of "
                        f"{', '.join(n for n in STRATEGIES if n != 'cfg')}")
    try:
        configs = [parse_config(part, STRATEGIES, "parallel strategy") for part in parts]
    except ValueError as err:
        raise UserError(str(err)) from None
    if len(configs) == 1:
        return configs[0]
    if isinstance(configs[1], CFGParallelConfig):
        raise UserError(f"parallel spec {spec!r} names cfg twice; give cfg+NAME with another strategy")
    return CFGCombinedConfig(configs[1])


def strategy_of(config) -> str:
    if isinstance(config, CFGCombinedConfig):
        return f"cfg+{strategy_of(config.inner)}"
    for name, (config_cls, _) in STRATEGIES.items():
        if isinstance(config, config_cls):
            return name
    raise UserError(f"{type(config).__name__} is not the config of a parallel strategy; "
                    f"known: {', '.join(c.__name__ for c, _ in STRATEGIES.values())}")


def _cfg_split(comm: Communicator) -> tuple[Communicator, Communicator]:
    """(this rank's CFG pair, this rank's half) of ``comm``'s ranks; every rank creates every
    group, in the same order, as torch.distributed requires."""
    ranks = [comm._global(r) for r in range(comm.size)]
    half = comm.size // 2
    halves = [dist.new_group(ranks[:half]), dist.new_group(ranks[half:])]
    pairs = [dist.new_group([ranks[i], ranks[i + half]]) for i in range(half)]
    mine = comm.rank % half
    return (Communicator(pairs[mine], counts=comm), Communicator(halves[comm.rank // half], counts=comm))


def _install(model: torch.nn.Module, config, handle: "ParallelHandle", comm: Communicator) -> None:
    if isinstance(config, CFGCombinedConfig):
        pair, half = _cfg_split(comm)
        _install(model, config.inner, handle, half)   # the inner strategy first: the batch split wraps it
        _install(model, CFGParallelConfig(), handle, pair)
        return
    STRATEGIES[strategy_of(config)][1](model, config, handle, comm)


def apply(target, spec, group: dist.ProcessGroup | None = None) -> ParallelHandle:
    """Install a strategy on ``target``'s denoiser (an sdinfer Pipeline, a diffusers pipeline or
    model) over ``group`` (default: all ranks); every rank of the group must call it alike."""
    from ..accelerate import denoiser_of, guidance_of, steps_of

    config = parse_spec(spec) if isinstance(spec, str) else spec
    name = strategy_of(config)
    model, scheduler = denoiser_of(target)
    model = getattr(model, "_orig_mod", model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(STEP_TRACKER) is not None:
        raise UserError(f"{type(model).__name__} already carries a cache or a parallel strategy: install the "
                        "parallel strategy first (one at a time), then the caches (sdinfer.accelerate)")
    try:
        comm = Communicator(group)
        config.check_world_size(comm.size)
        handle = ParallelHandle(name, comm=comm)
        try:
            _install(model, config, handle, comm)
            handle.register(model, StrategyHook(name, comm), hook_name("strategy"))
            handle.track_steps(model, steps_of(scheduler), guidance_of(target))
        except BaseException:
            handle.remove()
            raise
    except ValueError as err:
        raise UserError(str(err)) from None
    return handle


__all__ = ["STRATEGIES", "AsyncDiffConfig", "CFGCombinedConfig", "CFGParallelConfig", "Communicator", "DistriFusionConfig", "ParallelHandle", "PeerFailure", "PipeFusionConfig", "RingConfig",
           "UlyssesConfig", "apply", "parse_spec"]
