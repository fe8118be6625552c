"""First-Block Cache (ParaAttention, 2025; the residual-threshold cache of diffusers'
``FirstBlockCache``): DBCache (``dbcache.py``) with one front block and none behind.

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

from .base import CacheConfig, CacheHandle
from .dbcache import DBCacheConfig, apply_dbcache


class _FirstBlockOnly(DBCacheConfig):
    method = "fbcache"


@dataclass
class FirstBlockCacheConfig(CacheConfig):
    threshold: float = 0.08
    warmup: int = 0

    def __post_init__(self) -> None:
        self.warmup = self.as_dbcache().warmup   # validates, naming fbcache

    def as_dbcache(self) -> DBCacheConfig:
        return _FirstBlockOnly(fn=1, bn=0, threshold=self.threshold, warmup=self.warmup, taylorseer=False)


def apply_first_block_cache(model: torch.nn.Module, config: FirstBlockCacheConfig, handle: CacheHandle) -> None:
    apply_dbcache(model, config.as_dbcache(), handle)
