"""Scalar quantization shared by the methods: per-output-channel scales, the clipping search,
round to nearest, and activation scales from calibration data.

A weight W (out x in...) is quantized row by row: w_q = s_r * v[c], with c the code of the table
value v nearest w / s_r.  ``s_r = ratio * max|W_r| / max|v|``: ratio 1 is max scaling (RTN); the
clipping search tries ratios below 1 and keeps, per row, the one with the least squared error
(the per-layer "maximum" LBQ searches, and what a better int baseline does).

Affine (asymmetric) quantization, as Q-Diffusion and TFMQ-DM's uniform quantizers: w_q = s_r v[c]
+ o_r, the table's range mapped onto [min(W_r, 0), max(W_r, 0)] (shrunk by the clipping ratio),
the offset o_r a whole number of steps so that zero stays exact.  A skewed row or input (after a
GELU or SiLU nearly all of it is positive) then uses every level, where a symmetric scale leaves
half of them unused.
"""

from __future__ import annotations

import torch

from .formats import Format

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))   # 1.0 down to 0.6
ACTIVATION_SAMPLE = 20_000


def rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().reshape(weight.shape[0], -1)


def max_scale(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per output channel: max |w| / the format's max (a zero row gets scale 1)."""
    peak = rows(weight).abs().amax(dim=1)
    return torch.where(peak > 0, peak / fmt.max, torch.ones_like(peak))


def fake_quantize(weight: torch.Tensor, fmt: Format, scale: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight`` rounded to ``fmt`` at per-row ``scale`` (same shape as ``rows(weight)``)."""
    w, s = rows(weight), scale.reshape(-1, 1)
    return fmt.values[fmt.nearest(w / s)] * s


def affine_params(lo: torch.Tensor, hi: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) that map the table onto [min(lo, 0), max(hi, 0)], the offset a whole number
    of steps (zero exact); a zero range gets scale 1."""
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    first, last = float(fmt.values[0]), float(fmt.values[-1])
    span = hi - lo
    scale = torch.where(span > 0, span / (last - first), torch.ones_like(span))
    return scale, torch.round(lo / scale - first) * scale


def fake_quantize_affine(x: torch.Tensor, fmt: Format, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return fmt.round((x - offset) / scale) * scale + offset


def search_affine(weight: torch.Tensor, fmt: Format, ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per row: the clipping ratio of the row's [min, max] range with the least
    squared error."""
    w = rows(weight)
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_offset = affine_params(lo, hi, fmt)
    for ratio in ratios:
        scale, offset = affine_params(lo * ratio, hi * ratio, fmt)
        err = ((fake_quantize_affine(w, fmt, scale, offset) - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
        best_err = torch.where(better, err, best_err)
    return best_scale.reshape(-1), best_offset.reshape(-1)


def codes_of(weight: torch.Tensor, fmt: Format, scale: torch.Tensor) -> torch.Tensor:
    return fmt.nearest(rows(weight) / scale.reshape(-1, 1))


def search_clip(weight: torch.Tensor, fmt: Format, ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, squared error) per row: the clipping ratio of max scaling with the least error."""
    base = max_scale(weight, fmt)
    w = rows(weight)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for ratio in ratios:
        scale = base * ratio
        err = ((fake_quantize(weight, fmt, scale) - w) ** 2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, scale, best)
        best_err = torch.where(better, err, best_err)
    return best, best_err


def activation_scale(samples: list[torch.Tensor], fmt: Format, ratios=CLIP_RATIOS) -> torch.Tensor:
    """One scale for the activations in ``samples``: the clipping of their max with the least
    squared rounding error over all of them (max scaling where ``ratios`` is (1.0,))."""
    flat = torch.cat([s.reshape(-1).float() for s in samples])
    peak = float(flat.abs().max())
    if flat.numel() > ACTIVATION_SAMPLE:   # the error is estimated on a seeded sample; the peak is exact
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:ACTIVATION_SAMPLE]]
    if peak == 0:
        return torch.tensor(1.0)
    best, best_err = peak / fmt.max, float("inf")
    for ratio in ratios:
        scale = ratio * peak / fmt.max
        err = float(((fmt.round(flat / scale) * scale - flat) ** 2).sum())
        if err < best_err:
            best, best_err = scale, err
    return torch.tensor(best)
