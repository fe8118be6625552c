"""Quantization: one registry of methods over the model adapters, each a config dataclass and a
function from a ``QuantJob`` to the quantized layers.

    handle = sdinfer.quantize(pipe, "lbq:weights=fp4,activations=fp8")
    images = pipe(prompts)          # the denoiser runs its quantized layers
    handle.save("unet-lbq-w4")      # a folder that --model loads anywhere
    handle.remove()                 # the full-precision layers are back

Methods: ``rtn`` (round to nearest, the baseline), ``lbq`` (low-bit floating point with the
format searched per layer and learned rounding), ``tfm-ptq`` (temporal feature maintenance),
``vq4dit`` (vector-quantized weights).  torchao's configs and half precision are the other
baselines (``quant/torchao_baseline.py``): they make no folder of ours.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import UserError
from ..specs import parse_config
from .base import QuantJob, Quantized, targets_of, temporal_names
from .calibration import CalibrationConfig, calibration_for
from .rtn import RTNConfig, quantize_rtn

METHODS: dict[str, tuple[type, Callable]] = {
    "rtn": (RTNConfig, quantize_rtn),
}


def register_method(name: str, config_cls: type, fn: Callable) -> None:
    METHODS[name] = (config_cls, fn)


def _register_builtin() -> None:
    from .lbq import LBQConfig, quantize_lbq
    from .tfm_ptq import TFMPTQConfig, quantize_tfm_ptq
    from .vq4dit import VQ4DiTConfig, quantize_vq4dit

    for name, cls, fn in (("lbq", LBQConfig, quantize_lbq), ("tfm-ptq", TFMPTQConfig, quantize_tfm_ptq),
                          ("vq4dit", VQ4DiTConfig, quantize_vq4dit)):
        METHODS.setdefault(name, (cls, fn))


def parse_spec(spec: str):
    _register_builtin()
    try:
        return parse_config(spec, METHODS, "quantization method")
    except ValueError as err:
        raise UserError(str(err)) from None


def method_of(config) -> str:
    _register_builtin()
    for name, (cls, _) in METHODS.items():
        if isinstance(config, cls):
            return name
    raise UserError(f"{type(config).__name__} is not the config of a quantization method; "
                    f"known: {', '.join(sorted(METHODS))}")


def _settings(config) -> dict:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def quantize(target, spec, calibration: CalibrationConfig | None = None,
             prompts: list[str] | None = None, pipeline_kwargs: dict | None = None) -> Quantized:
    """Quantize the denoiser of ``target`` (sdinfer's ``Pipeline``, a diffusers pipeline, or for
    methods that need no data a bare diffusers model) by ``spec`` (``"lbq:weights=fp4"`` or a
    config), calibrating on its own trajectories over ``prompts`` (default: training captions;
    ``pipeline_kwargs`` go to a diffusers pipeline's calibration calls); returns the installed
    handle (``remove()``, ``save(folder)``)."""
    from ..accelerate import denoiser_of

    config = parse_spec(spec) if isinstance(spec, str) else spec
    method = method_of(config)
    model, _ = denoiser_of(target)
    model = getattr(model, "_orig_mod", model)
    if any(type(m).__name__ == "QuantizedLayer" for m in model.modules()):
        raise UserError("this model is already quantized; quantize the full-precision model (remove() the "
                        "other handle first, or load the original folder)")
    targets = targets_of(model)
    calib_config = calibration or CalibrationConfig()
    calib = None
    if getattr(config, "needs_calibration", True):
        calib = calibration_for(target, model, calib_config, prompts, pipeline_kwargs)
    job = QuantJob(model, targets, temporal_names(model) & set(targets), calib)
    start = time.perf_counter()
    try:
        layers = METHODS[method][1](job, config)
    except ValueError as err:
        raise UserError(f"{method}: {err}") from None
    cost = calib.cost.as_dict() if calib is not None else {"seconds": 0.0, "passes": 0, "model_calls": 0}
    info = {"prompts": len(calib.prompts) if calib else 0, "steps": calib_config.steps,
            "guidance_scale": calib_config.guidance_scale, "seed": calib_config.seed,
            "trajectories": cost, "total_seconds": round(time.perf_counter() - start, 2)}
    return Quantized(model, method, _settings(config), layers, calibration=info).install()


__all__ = ["METHODS", "CalibrationConfig", "QuantJob", "Quantized", "parse_spec", "quantize", "register_method",
           "targets_of", "temporal_names"]
