"""TFM-PTQ (placeholder until the method lands in this session)."""
from dataclasses import dataclass


@dataclass
class TFMPTQConfig:
    weights: str = "int4"
    activations: str = "int8"


def quantize_tfm_ptq(job, config):
    raise NotImplementedError
