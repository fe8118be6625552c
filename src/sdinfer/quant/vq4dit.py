"""VQ4DiT (placeholder until the method lands in this session)."""
from dataclasses import dataclass


@dataclass
class VQ4DiTConfig:
    bits: int = 2


def quantize_vq4dit(job, config):
    raise NotImplementedError
