"""LBQ: low-bit floating-point post-training quantization of diffusion models (Chen, Giannoula,
Moshovos, "Low-Bitwidth Floating Point Quantization for Efficient High-Quality Diffusion
Models", arXiv 2408.06995).

Per layer (Section 3 of the paper):

1. Format search.  For each exponent / mantissa split of the weight width (FP8: E4M3, E5M2,
   E3M4; FP6: E2M3, E3M2; FP4: E2M1, E1M2, E3M0) the per-channel maximum is searched (the clipping
   ratio of max scaling with the least weight error; the exponent bias is a power-of-two factor of
   that maximum) and the split whose layer output ||W X - W_q X||^2 on the calibration inputs
   is least is kept.
2. Rounding.  FP4 weights (``rounding=auto``; ``learned`` for every width) take AdaRound-style
   learned rounding between the neighbouring FP values against the layer output
   (``quant/rounding.py``), the other widths round to nearest.
3. Activations.  Each layer's input is quantized to FP8 (``activations=fp8``; ``""`` keeps them
   in full precision) with the split and per-tensor maximum of least error on the calibration
   activations.

Calibration inputs are the layer inputs along the model's own DDIM trajectories on training
captions (``quant/calibration.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import QuantJob
from .formats import FP_SPLITS, fp_candidates
from .layers import ActivationQuantizer, QuantizedLayer, conv_args, kind_of
from .rounding import layer_output, learn_rounding
from .scalar import ACTIVATION_SAMPLE, activation_scale, codes_of, search_clip

ROUNDINGS = ("auto", "learned", "nearest")
MAX_SEARCH_INPUTS = 16


@dataclass
class LBQConfig:
    weights: str = "fp4"        # fp8, fp6, fp4 (split searched per layer) or one split (fp4_e2m1)
    activations: str = "fp8"    # fp8 (split searched per layer), one split, or "" for weight-only
    rounding: str = "auto"      # learned for FP4, nearest otherwise; or learned / nearest everywhere
    iters: int = 300            # learned-rounding iterations per layer

    def __post_init__(self):
        self.weight_formats = fp_candidates(self.weights)
        if self.weight_formats[0].bits > 8:
            raise UserError(f"lbq weights take 4 to 8 bits ({', '.join(FP_SPLITS)}), not {self.weights}")
        self.act_formats = fp_candidates(self.activations) if self.activations else []
        if self.rounding not in ROUNDINGS:
            raise UserError(f"lbq rounding={self.rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.iters < 1:
            raise UserError(f"lbq iters must be at least 1, not {self.iters}")

    @property
    def learned(self) -> bool:
        return self.rounding == "learned" or (self.rounding == "auto" and self.weight_formats[0].bits <= 4)


def _output_error(module, kind: str, conv: dict, weight_q: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    w = module.weight.detach().float()
    return sum(float((layer_output(kind, conv, x, weight_q) - layer_output(kind, conv, x, w)).pow(2).sum())
               for x in inputs)


def choose_format(module, kind: str, conv: dict, formats, inputs: list[torch.Tensor]):
    """(format, per-row scale) of least output error on ``inputs`` (weight error if none)."""
    best = None
    for fmt in formats:
        scale, weight_err = search_clip(module.weight, fmt)
        w_q = (fmt.values[codes_of(module.weight, fmt, scale)] * scale.reshape(-1, 1)).reshape(module.weight.shape)
        err = _output_error(module, kind, conv, w_q, inputs) if inputs else float(weight_err.sum())
        if best is None or err < best[0]:
            best = (err, fmt, scale)
    return best[1], best[2]


def activation_quantizer(formats, samples: list[torch.Tensor]) -> ActivationQuantizer:
    """The FP split and per-tensor scale of least error on ``samples``."""
    best = None
    flat = torch.cat([s.reshape(-1) for s in samples])
    if flat.numel() > ACTIVATION_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:ACTIVATION_SAMPLE]]
    for fmt in formats:
        scale = activation_scale(samples, fmt)
        err = float(((fmt.round(flat / scale) * scale - flat) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, fmt, scale)
    return ActivationQuantizer(best[1], best[2])


def quantize_lbq(job: QuantJob, config: LBQConfig) -> dict[str, QuantizedLayer]:
    inputs = job.calibration.inputs(job.targets)
    out = {}
    for name, module in job.targets.items():
        kind, conv = kind_of(module), conv_args(module)
        samples = [c.input for c in inputs[name]]
        if not samples:
            raise UserError(f"layer {name} was never called on the calibration trajectories; it cannot be "
                            "calibrated (is it used by this pipeline?)")
        step = max(1, len(samples) // MAX_SEARCH_INPUTS)
        fmt, scale = choose_format(module, kind, conv, config.weight_formats, samples[::step])
        if config.learned:
            codes = learn_rounding(module.weight, fmt, scale, samples, kind, conv, iters=config.iters)
        else:
            codes = codes_of(module.weight, fmt, scale)
        act = activation_quantizer(config.act_formats, samples) if config.act_formats else None
        out[name] = QuantizedLayer.from_codes(module, codes, fmt.values, scale, fmt.name, act=act)
    return out
