"""Turning ``--device`` and ``--dtype`` text into torch objects, with one clear error each."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def resolve_device(text: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown torch device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(text)!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {str(text)!r} asked for, but this machine has "
                            f"{torch.cuda.device_count()} CUDA GPU(s); use cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"device {str(text)!r} asked for, but this torch has no MPS backend; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"device {str(text)!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(text: str | torch.dtype) -> torch.dtype:
    """``float32``, ``float16`` or ``bfloat16`` (or fp32, fp16, half, bf16)."""
    if isinstance(text, torch.dtype):
        if text in DTYPES.values():
            return text
        raise UserError(f"dtype {text} is not supported; use {', '.join(DTYPES)}")
    key = DTYPE_ALIASES.get(str(text).lower(), str(text).lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {text!r}; use {', '.join(DTYPES)}")
    return DTYPES[key]
