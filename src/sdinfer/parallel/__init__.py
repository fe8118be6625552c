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
parallelism of a DiT's image tokens).  Launching, failure handling: ``launch.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from .. import cache
from ..cache.base import CacheHandle
from ..errors import UserError
from .cfg_parallel import CFGParallelConfig, apply_cfg_parallel
from .comm import Communicator, PeerFailure
from .sequence_parallel import RingConfig, UlyssesConfig, apply_ring, apply_ulysses

STRATEGIES: dict[str, tuple[type, Callable]] = {
    "cfg": (CFGParallelConfig, apply_cfg_parallel),
    "ulysses": (UlyssesConfig, apply_ulysses),
    "ring": (RingConfig, apply_ring),
}


@dataclass
class ParallelHandle(CacheHandle):
    """The hooks of one applied strategy (``remove()`` takes them off) and its communicator."""

    comm: Communicator | None = None


def parse_spec(spec: str):
    """A strategy's config from ``NAME[:key=value,...]``; one strategy at a time for now."""
    if "+" in spec:
        raise UserError(f"parallel spec {spec!r} combines strategies, which is not supported yet; "
                        f"give one of {', '.join(STRATEGIES)}")
    try:
        return cache.parse_spec(spec, STRATEGIES, "parallel strategy")
    except ValueError as err:
        raise UserError(str(err)) from None


def strategy_of(config) -> str:
    for name, (config_cls, _) in STRATEGIES.items():
        if isinstance(config, config_cls):
            return name
    raise UserError(f"{type(config).__name__} is not the config of a parallel strategy; "
                    f"known: {', '.join(c.__name__ for c, _ in STRATEGIES.values())}")


def apply(target, spec, group: dist.ProcessGroup | None = None) -> ParallelHandle:
    """Install a strategy on ``target``'s denoiser (an sdinfer Pipeline, a diffusers pipeline or
    model) over ``group`` (default: all ranks); every rank of the group must call it alike."""
    from ..accelerate import denoiser_of

    config = parse_spec(spec) if isinstance(spec, str) else spec
    name = strategy_of(config)
    model, _ = denoiser_of(target)
    model = getattr(model, "_orig_mod", model)
    try:
        comm = Communicator(group)
        config.check_world_size(comm.size)
        handle = ParallelHandle(name, comm=comm)
        try:
            STRATEGIES[name][1](model, config, handle, comm)
        except BaseException:
            handle.remove()
            raise
    except ValueError as err:
        raise UserError(str(err)) from None
    return handle


__all__ = ["STRATEGIES", "CFGParallelConfig", "Communicator", "ParallelHandle", "PeerFailure", "RingConfig",
           "UlyssesConfig", "apply", "parse_spec"]
