"""What every quantization method shares: which layers it quantizes, the job it is handed, and
the handle that installs, removes and saves its layers.

The layers quantized are found through the model's adapter (``models/adapters.py``): every
Linear and Conv2d inside the declared blocks, plus the temporal path the adapter declares (the
time embedding and each block's projection of it).  The input and output projections (a UNet's
conv_in / conv_out, a DiT's patch embedding and final projection) and the text / class
embedders stay in full precision, as in Q-Diffusion and TFMQ-DM.

Installing swaps each Linear / Conv2d for its ``QuantizedLayer`` in its parent module (as
diffusers' own quantizers and torchao's weight swaps do: the module a hook or ``torch.compile``
sees is an ordinary module); ``remove()`` puts the original modules back.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..models.adapters import adapter_for
from .calibration import Calibration
from .layers import QuantizedLayer, kind_of


def _adapter(model: torch.nn.Module):
    try:
        return adapter_for(model)
    except ValueError as err:
        raise UserError(f"cannot quantize this model: {err}") from None


def temporal_names(model: torch.nn.Module) -> set[str]:
    """Qualified names of the Linear / Conv2d layers on the adapter's temporal path."""
    patterns = _adapter(model).temporal
    return {name for name, module in model.named_modules()
            if kind_of(module) and any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def targets_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a method quantizes (name -> Linear / Conv2d), in forward order."""
    adapter = _adapter(model)
    inside = {f"{block_name}.{name}" if name else block_name
              for block_name, block in adapter.blocks(model)
              for name, module in block.named_modules() if kind_of(module)}
    chosen = inside | temporal_names(model)
    return {name: module for name, module in model.named_modules() if name in chosen}


@dataclass
class QuantJob:
    """What a method is handed: the model, the layers to quantize, which of them are temporal,
    and the calibration runs along the model's trajectories."""

    model: torch.nn.Module
    targets: dict[str, torch.nn.Module]
    temporal: set[str]
    calibration: Calibration | None


@dataclass(repr=False)
class Quantized:
    """The quantized layers of one ``sdinfer.quantize`` call, installed on ``model``."""

    model: torch.nn.Module
    method: str
    settings: dict
    layers: dict[str, QuantizedLayer]
    originals: dict[str, torch.nn.Module] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)   # prompts, steps, seed, cost

    def __repr__(self) -> str:
        return (f"Quantized({self.spec} on {type(self.model).__name__}: {len(self.layers)} layers, "
                f"{self.bits_per_weight():.2f} bits per weight)")

    @property
    def spec(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.method}:{opts}" if opts else self.method

    def install(self) -> "Quantized":
        for name, layer in self.layers.items():
            self.originals.setdefault(name, self.model.get_submodule(name))
            self.model.set_submodule(name, layer)
        return self

    def remove(self) -> None:
        """Put the full-precision layers back (a model loaded from a quantized folder has none)."""
        if not self.originals:
            raise UserError("this model was loaded quantized: there are no full-precision layers to restore; "
                            "load the original model instead")
        for name, original in self.originals.items():
            self.model.set_submodule(name, original)
        self.originals.clear()

    def bits_per_weight(self) -> float:
        """Bits per quantized weight, codes, tables and scales included."""
        numel = sum(layer.numel for layer in self.layers.values())
        return sum(layer.storage_bits() for layer in self.layers.values()) / max(numel, 1)

    def summary(self) -> dict:
        formats: dict[str, int] = {}
        for layer in self.layers.values():
            formats[layer.format_name] = formats.get(layer.format_name, 0) + 1
        return {"method": self.method, "settings": self.settings, "layers": len(self.layers),
                "bits_per_weight": round(self.bits_per_weight(), 3), "formats": formats,
                "calibration": self.calibration}

    def save(self, out, source=None, overwrite: bool = False):
        """Write the quantized pipeline folder (``quant/folder.py``)."""
        from .folder import save_quantized

        return save_quantized(self, out, source, overwrite)
