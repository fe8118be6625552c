"""Where a model runs and in what precision: the user's ``--device`` / ``--dtype`` checked once.

``resolve_device`` and ``resolve_dtype`` turn a name (or a torch object) into a torch.device /
torch.dtype, or raise a ``UserError`` naming what this machine offers instead.  The rest of the
library takes what they return: the model, text encoder and VAE are loaded in the dtype and moved
to the device; noise is drawn on the CPU in float32 and moved (so an image does not depend on the
device's random generator); the sampler's state stays float32 on the device and the model is
called in its own dtype (``cast_model_fn``).

float16 on the CPU is allowed with a warning: the CPU kernels for it are slow and half
precision's range (65504) can overflow in a model trained in float32.  bfloat16 has float32's
range and is the half precision to use on the CPU.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .errors import UserError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
HALF_DTYPES = (torch.float16, torch.bfloat16)
CPU_FLOAT16_WARNING = ("float16 on the CPU is slow (few CPU kernels run it natively) and may overflow "
                       "to inf; use --dtype bfloat16 on the CPU, or float16 on a GPU")


def _torch_build() -> str:
    return f"torch {torch.__version__}"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (or a torch.device; None: the CPU), checked
    to exist on this machine."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev, text = device, str(device)
    else:
        text = str(device).strip()
        try:
            dev = torch.device(text.lower())
        except (RuntimeError, ValueError):
            raise UserError(f"--device {text}: unknown torch device, not a torch device name; use cpu, cuda, "
                            "cuda:N or mps") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("no CUDA GPU: this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU: this torch build has CUDA but sees no GPU")
            raise UserError(f"--device {text}: {why} ({_torch_build()}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {text}: this machine has {count} CUDA device"
                            f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}); pick one of them")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {text}: MPS (Apple GPU) is not available in this torch build "
                            f"({_torch_build()}) or machine; use --device cpu")
        return dev
    raise UserError(f"--device {text}: sdinfer runs on cpu, cuda, cuda:N or mps, not {dev.type}")


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``"float32"``, ``"float16"``, ``"bfloat16"`` (also fp32, fp16, bf16, half) or a torch
    floating dtype; None: float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UserError(f"--dtype {dtype}: sdinfer computes in float32, float16 or bfloat16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"--dtype {dtype}: unknown dtype {key!r}; use float32, float16 (fp16) or bfloat16 (bf16)")
    return DTYPES[key]


def check_combination(device: torch.device, dtype: torch.dtype) -> None:
    """Warn about float16 on the CPU (allowed: it runs, slowly); refuse bfloat16 on a GPU that has none."""
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn(CPU_FLOAT16_WARNING, stacklevel=3)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                        "support; use --dtype float16")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampler's arithmetic runs in for a sample of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def cast_model_fn(model_fn: Callable, model_dtype: torch.dtype) -> Callable:
    """``model_fn(x, t, text)`` called with ``x`` in the model's dtype and its output returned in
    ``x``'s dtype (the timestep stays as given: a bfloat16 timestep 999 would round to 1000)."""
    def call(x, t, text):
        out = model_fn(x.to(model_dtype), t, text)
        return out.to(x.dtype)
    return call


def draw_noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise of ``shape`` from ``generator`` (drawn on the generator's own device, in
    float32 or float64), then moved to ``like``'s device and dtype: the same numbers on any device."""
    draw_dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=draw_dtype, device=device).to(like.device, like.dtype)


# ---- ranks: one GPU each, and the backend that carries their tensors -------------------------
def rank_device(device: torch.device, local_rank: int, gpus: int | None = None) -> torch.device:
    """The device of the rank ``local_rank`` on its machine: ``cuda`` becomes ``cuda:LOCAL_RANK``
    (wrapping round when there are more ranks than GPUs); the CPU and an explicit ``cuda:N``
    stay as given."""
    if device.type != "cuda" or device.index is not None:
        return device
    gpus = torch.cuda.device_count() if gpus is None else gpus
    return torch.device("cuda", local_rank % max(gpus, 1))


def distributed_backend(device: torch.device, local_world_size: int = 1, gpus: int | None = None) -> str:
    """nccl when every rank on the machine has a GPU of its own; gloo on the CPU, and when ranks
    share a GPU (NCCL refuses two ranks on one device; gloo copies CUDA tensors through the host)."""
    if device.type != "cuda":
        return "gloo"
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device.index is not None and local_world_size > 1:
        return "gloo"   # every rank on the one named GPU
    return "nccl" if local_world_size <= gpus else "gloo"
