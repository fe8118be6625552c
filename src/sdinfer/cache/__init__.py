"""Feature caches: one registry of methods, each a config dataclass and an apply function.

``parse_spec("deepcache:interval=3,branch=1")`` gives the method's config; ``apply(model,
config)`` installs it and returns the ``CacheHandle`` that removes it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .base import CacheHandle
from .block_caching import BlockCachingConfig, apply_block_caching
from .dbcache import DBCacheConfig, apply_dbcache
from .deepcache import DeepCacheConfig, apply_deepcache
from .first_block_cache import FirstBlockCacheConfig, apply_first_block_cache
from .fora import FORAConfig, apply_fora
from .learning_to_cache import LearningToCacheConfig, apply_learning_to_cache
from .magcache import MagCacheConfig, apply_magcache
from .taylorseer import TaylorSeerConfig, apply_taylorseer
from .teacache import TeaCacheConfig, apply_teacache
from .tgate import TGateConfig, apply_tgate

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
}


def _typed(text: str, like):
    if isinstance(like, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if isinstance(like, (int, float)) and not isinstance(like, bool):
        number = float(text)
        return int(number) if isinstance(like, int) and number == int(number) else number
    return text


def parse_spec(spec: str, methods: dict | None = None, kind: str = "cache method"):
    """A method's config from ``NAME[:key=value,...]`` (of ``methods``: default the caches)."""
    methods = METHODS if methods is None else methods
    name, _, opts = spec.partition(":")
    name = name.strip().lower()
    if name not in methods:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(methods))}")
    config_cls = methods[name][0]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = config_cls()
    kwargs = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{name} option {item!r} must look like key=value")
        if key not in fields:
            raise ValueError(f"{name} has no option {key!r}; its options: {', '.join(fields) or 'none'}")
        try:
            kwargs[key] = _typed(value.strip(), getattr(defaults, key))
        except ValueError:
            raise ValueError(f"{name} option {key}={value.strip()!r} is not a "
                             f"{type(getattr(defaults, key)).__name__}") from None
    return config_cls(**kwargs)


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


__all__ = ["CacheHandle", "METHODS", "apply", "parse_spec", "DeepCacheConfig", "FORAConfig", "FirstBlockCacheConfig",
           "DBCacheConfig", "TaylorSeerConfig", "TGateConfig",
           "BlockCachingConfig", "LearningToCacheConfig", "TeaCacheConfig", "MagCacheConfig"]
