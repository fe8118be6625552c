"""The baselines with real kernels: torchao's configs and PyTorch's own dynamic int8 Linear.

Our methods' formats are simulated (``quant/layers.py``); these run low-precision kernels, so
their wall time is what the hardware gives:

- ``torchao-int8-dynamic``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (int8 weights per
  channel, activations quantized per token at run time, an int8 x int8 matmul: ``torch._int_mm``
  on the CPU);
- ``torchao-int8-weight``: ``Int8WeightOnlyConfig`` (int8 weights, float activations);
- ``torch-dynamic-int8``: ``torch.ao.quantization.quantize_dynamic`` (fbgemm's int8 Linear with
  dynamic activation scales: the kernel PyTorch ships for x86 CPUs).

On a GPU torchao's int8 configs and its float8 ones (``Float8DynamicActivationFloat8WeightConfig``:
FP8 GEMMs on Hopper) are the kernels our int8 / FP8 formats would use; ``bench/gpu_check.py`` runs
them when a device is lent.  Each applies to the Linear layers among ``targets_of(model)`` (torchao
quantizes no Conv2d) and returns a function that restores the full-precision weights.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..errors import UserError
from .base import targets_of

KERNELS = ("torchao-int8-dynamic", "torchao-int8-weight", "torch-dynamic-int8")


def _torchao_config(name: str):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    except ImportError:
        raise UserError(f"{name} needs torchao: pip install 'sdinfer[quant]' (torchao>=0.18)") from None
    return Int8DynamicActivationInt8WeightConfig() if name == "torchao-int8-dynamic" else Int8WeightOnlyConfig()


def linear_targets(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in targets_of(model).items() if type(m) is torch.nn.Linear}


def apply_kernel(model: torch.nn.Module, name: str) -> Callable[[], None]:
    """Quantize ``model``'s target Linear layers with kernel baseline ``name``; returns ``restore``."""
    if name not in KERNELS:
        raise UserError(f"unknown kernel baseline {name!r}; known: {', '.join(KERNELS)}")
    linears = linear_targets(model)
    if name == "torch-dynamic-int8":
        originals = dict(linears)
        for layer_name, layer in linears.items():
            holder = torch.nn.Sequential(layer)
            with warnings.catch_warnings():   # torch deprecates its quantized tensors in favour of torchao
                warnings.simplefilter("ignore", UserWarning)
                torch.ao.quantization.quantize_dynamic(holder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            model.set_submodule(layer_name, holder[0])

        def restore_modules():
            for layer_name, layer in originals.items():
                model.set_submodule(layer_name, layer)
        return restore_modules

    from torchao.quantization import quantize_

    config = _torchao_config(name)
    saved = {layer_name: layer.weight for layer_name, layer in linears.items()}
    chosen = set(linears.values())
    quantize_(model, config, filter_fn=lambda module, fqn: module in chosen)

    def restore_weights():
        for layer_name, weight in saved.items():
            model.get_submodule(layer_name).weight = weight
    return restore_weights
