"""Will a generation fit in memory?  An estimate from the model's shape, checked against what
the device has free before anything large is allocated, so that a size or batch too large is one
clear error instead of a traceback from the allocator or the kernel's out-of-memory killer.

The estimate counts the activations a forward pass keeps alive at once: they grow linearly with
the number of sample positions (a UNet keeps every level's output for its skip connections, a
transformer a few tensors of its inner width per token).  Attention is counted at linear cost:
torch's scaled_dot_product_attention uses a fused kernel that does not hold the tokens^2 score
matrix on the CPU and on CUDA.  The factor was measured on the default UNet (peak RSS at 64-512
px, about 340 floats per pixel and sample, 12 live tensors of the width below)."""

from __future__ import annotations

import os

LIVE_TENSORS = 12          # tensors of the model's (resolution-weighted) width alive at the peak
HEADROOM = 0.9             # of the free memory a generation may plan to use


def _pyramid_width(channels) -> float:
    """Floats per full-resolution position of a UNet-like pyramid: level i has 4**-i positions."""
    return sum(float(c) / 4 ** i for i, c in enumerate(channels))


def denoiser_width(denoiser) -> float:
    """Floats per sample position (per element of the latent's spatial grid) of one live tensor."""
    cfg = denoiser.config
    if getattr(cfg, "block_out_channels", None):
        return _pyramid_width(cfg.block_out_channels)
    patch = int(getattr(cfg, "patch_size", None) or 1)
    heads = int(getattr(cfg, "num_attention_heads", None) or 1)
    head_dim = int(getattr(cfg, "attention_head_dim", None) or 64)
    inner = max(heads * head_dim, int(getattr(cfg, "hidden_size", 0) or 0))
    return inner * 4 / patch ** 2      # the MLP's hidden layer is four times the inner width


def generation_bytes(model, size: int, batch: int, guidance: bool, element_bytes: int = 4) -> int:
    """Bytes of activations that generating ``batch`` images of side ``size`` needs at its peak:
    the denoiser's pass (on 2 * batch samples under guidance) or the VAE's decode, the larger."""
    latent_positions = (size // model.vae_factor) ** 2
    samples = batch * (2 if guidance else 1)
    need = LIVE_TENSORS * denoiser_width(model.denoiser) * latent_positions * samples
    if model.vae is not None:
        decode = LIVE_TENSORS * _pyramid_width(model.vae.config.block_out_channels) * size ** 2 * batch
        need = max(need, decode)
    return int(need * element_bytes)


def _available_ram() -> int | None:
    try:
        import psutil  # optional: used where installed
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device) -> int | None:
    """Free memory of ``device`` (a torch.device), or None where it cannot be told."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _available_ram()         # the CPU, and mps's unified memory


def check_fits(model, size: int, batch: int, guidance: bool, device, dtype) -> None:
    """Raise UserError when the generation is estimated not to fit the device's free memory."""
    import torch

    from .errors import UserError

    free = available_bytes(device)
    if free is None:
        return
    element = torch.empty((), dtype=dtype).element_size()
    need = generation_bytes(model, size, batch, guidance, element)
    if need <= HEADROOM * free:
        return
    fit = size
    while fit > model.spatial_factor and generation_bytes(model, fit, batch, guidance, element) > HEADROOM * free:
        fit = max(model.spatial_factor, (fit // 2) // model.spatial_factor * model.spatial_factor)
    hint = f"use a size of {fit} or less" if fit < size else "use a smaller size"
    if batch > 1:
        hint += " or a smaller batch"
    raise UserError(f"size {size} x batch {batch} needs about {need / 2**30:.1f} GiB on {device} and "
                    f"{free / 2**30:.1f} GiB are free; {hint}")
