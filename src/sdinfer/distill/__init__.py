"""Distilled model variants that make one model evaluation cheaper: each technique's modules or
fine-tuned weights are trained from the model itself (``sdinfer distill PROCEDURE``), saved
beside it and mounted by ``sdinfer.accelerate`` like a cache."""

from .. import cache as _cache  # noqa: F401  (the registry first: it imports these variants, mounted like caches)
