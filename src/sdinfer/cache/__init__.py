"""Feature caches: one registry of methods, each a config dataclass and an apply function.

``parse_spec("deepcache:interval=3,branch=1")`` gives the method's config; ``apply(model,
config)`` installs it and returns the ``CacheHandle`` that removes it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..specs import parse_config
from .base import CacheConfig, CacheHandle
from .block_caching import BlockCachingConfig, apply_block_caching
from .dbcache import DBCacheConfig, apply_dbcache
from .deepcache import DeepCacheConfig, apply_deepcache
from .ditfastattn import DiTFastAttnConfig, apply_ditfastattn
from .first_block_cache import FirstBlockCacheConfig, apply_first_block_cache
from .fora import FORAConfig, apply_fora
from .learning_to_cache import LearningToCacheConfig, apply_learning_to_cache
from .magcache import MagCacheConfig, apply_magcache
from .taylorseer import TaylorSeerConfig, apply_taylorseer
from .teacache import TeaCacheConfig, apply_teacache
from .tgate import TGateConfig, apply_tgate
from ..distill.early_exit import EarlyExitConfig, apply_early_exit
from ..distill.linfusion import LinFusionConfig, apply_linfusion

METHODS: dict[str, tuple[type, Callable]] = {
    "deepcache": (DeepCacheConfig, apply_deepcache),
    "fora": (FORAConfig, apply_fora),
    "fbcache": (FirstBlockCacheConfig, apply_first_block_cache),
    "dbcache": (DBCacheConfig, apply_dbcache),
    "taylorseer": (TaylorSeerConfig, apply_taylorseer),
    "tgate": (TGateConfig, apply_tgate),
    "blockcache": (BlockCachingConfig, apply_block_caching),
    "l2c": (LearningToCacheConfig, apply_learning_to_cache),
    "teacache": (TeaCacheConfig, apply_teacache),
    "magcache": (MagCacheConfig, apply_magcache),
    "ditfastattn": (DiTFastAttnConfig, apply_ditfastattn),
    "linfusion": (LinFusionConfig, apply_linfusion),
    "early-exit": (EarlyExitConfig, apply_early_exit),
}


def parse_spec(spec: str, methods: dict | None = None, kind: str = "cache method"):
    """A method's config from ``NAME[:key=value,...]`` (of ``methods``: default the caches)."""
    return parse_config(spec, METHODS if methods is None else methods, kind)


def exact_parallel_methods(strategy: str | None = None) -> tuple[str, ...]:
    """The caches that may run under the exact parallel ``strategy`` (``cfg+NAME``: under both; None:
    under every exact strategy), as their ``CacheConfig.exact_parallel`` says."""
    def allows(rule) -> bool:
        if isinstance(rule, bool):
            return rule
        return strategy is not None and all(part in rule for part in strategy.split("+"))
    return tuple(name for name, (config_cls, _) in METHODS.items() if allows(config_cls.exact_parallel))


def method_of(config) -> str:
    for name, (config_cls, _) in METHODS.items():
        if isinstance(config, config_cls):
            return name
    raise TypeError(f"{type(config).__name__} is not the config of a cache method; "
                    f"known: {', '.join(c.__name__ for c, _ in METHODS.values())}")


def apply(model: torch.nn.Module, config, num_steps: Callable[[], int] | None = None,
          guided: Callable[[], bool] | None = None) -> CacheHandle:
    """Install ``config``'s method on ``model`` (a denoiser with a declared adapter).  Outside
    sdinfer's loop ``num_steps()`` and ``guided()`` tell the step count and whether the pipeline
    batches its guidance branches."""
    name = method_of(config)
    handle = CacheHandle(name)
    try:
        METHODS[name][1](model, config, handle)
        handle.track_steps(model, num_steps, guided)
    except BaseException:
        handle.remove()
        raise
    return handle


__all__ = ["CacheConfig", "CacheHandle", "METHODS", "apply", "exact_parallel_methods", "parse_spec", "DeepCacheConfig", "FORAConfig", "FirstBlockCacheConfig",
           "DBCacheConfig", "TaylorSeerConfig", "TGateConfig",
           "BlockCachingConfig", "LearningToCacheConfig", "TeaCacheConfig", "MagCacheConfig", "DiTFastAttnConfig", "LinFusionConfig", "EarlyExitConfig"]
