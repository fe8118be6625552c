"""Round to nearest: the baseline every method is compared with.

Weights: per-output-channel symmetric scale max|W_r| / max|v| and the nearest table value
(``weights=int8`` / ``int4`` / ``int2`` / any FP split; no clipping search, no calibration).
Activations (``activations=int8`` / ``fp8``): one scale per layer from the largest input seen on
the calibration trajectories (max scaling), the W4A8 / W8A8 baseline of TFM-PTQ's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import QuantJob
from .formats import named_format
from .layers import ActivationQuantizer, QuantizedLayer
from .scalar import activation_scale, codes_of, max_scale


@dataclass
class RTNConfig:
    weights: str = "int8"
    activations: str = ""     # "" (weight-only), int8 or fp8

    def __post_init__(self):
        named_format(self.weights)
        if self.activations:
            named_format(self.activations)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.activations)


def quantize_rtn(job: QuantJob, config: RTNConfig) -> dict[str, QuantizedLayer]:
    fmt = named_format(config.weights)
    act_fmt = named_format(config.activations) if config.activations else None
    inputs = job.calibration.inputs(job.targets) if act_fmt is not None else {}
    out = {}
    for name, module in job.targets.items():
        scale = max_scale(module.weight, fmt)
        act = None
        if act_fmt is not None:
            act = ActivationQuantizer(act_fmt, activation_scale([c.input for c in inputs[name]], act_fmt, (1.0,)))
        out[name] = QuantizedLayer.from_codes(module, codes_of(module.weight, fmt, scale), fmt.values, scale,
                                              fmt.name, act=act)
    return out
