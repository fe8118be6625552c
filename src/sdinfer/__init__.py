"""sdinfer: faster diffusion inference, measured.

The names below are imported on first use (module ``__getattr__``), so that ``import sdinfer``
and the command line's ``--help`` do not wait for torch and diffusers to load."""

import sys
import types

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402  (no torch behind it)
from .import_noise import install as _drop_import_noise  # noqa: E402

_drop_import_noise()

_LAZY = {
    "accelerate": (".accelerate", "accelerate"),
    "StepContext": (".context", "StepContext"),
    "current_step": (".context", "current_step"),
    "Denoiser": (".denoiser", "Denoiser"),
    "sample": (".sampling", "sample"),
    "FlowMatchSchedule": (".schedules", "FlowMatchSchedule"),
    "NoiseSchedule": (".schedules", "NoiseSchedule"),
    "quantize": (".quant", "quantize"),
}

__all__ = ["Denoiser", "accelerate", "FlowMatchSchedule", "NoiseSchedule", "StepContext", "UserError",
           "current_step", "quantize", "sample", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sdinfer' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value    # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule ``sdinfer.accelerate`` binds the package attribute of that name to
    the module; keep it the function, as an eager ``from .accelerate import accelerate`` did."""

    def __setattr__(self, name, value):
        if name == "accelerate" and isinstance(value, types.ModuleType):
            value = value.accelerate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
