"""Learned rounding (AdaRound, Nagel et al. ICML 2020, Eq. 21-24) over any format's value table.

Each weight w (divided by its row's scale s) lies between two table values, lo <= w/s <= hi.
Rounding chooses one: w_q = s (lo + h(V) (hi - lo)) with h(V) = clip(sigmoid(V) (zeta - gamma) +
gamma, 0, 1), the rectified sigmoid (zeta = 1.1, gamma = -0.1), V initialised so that h(V) is the
fractional position of w/s between its neighbours.  V is learned by Adam against the layer's
output on calibration inputs,

    min_V  || W X - W_q(V) X ||^2  +  lambda sum(1 - |2 h(V) - 1|^beta)

with beta annealed from 20 to 2 after a warm-up, which drives every h(V) to 0 or 1; the codes
are then lo or hi by h(V) >= 0.5.  For an FP table the gaps differ between binades, so the
neighbours come from the table itself (``Format.between``), not from a uniform grid: this is how
LBQ learns FP4 rounding, and TFM-PTQ the rounding of its reconstructed layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import Format
from .scalar import rows

ZETA, GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def layer_output(module_kind: str, conv: dict, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output without bias (the bias is not quantized and cancels in the loss)."""
    if module_kind == "linear":
        return F.linear(x, w)
    return F.conv2d(x, w, None, tuple(conv["stride"]), conv["padding"] if isinstance(conv["padding"], str)
                    else tuple(conv["padding"]), tuple(conv["dilation"]), conv["groups"])


def learn_rounding(weight: torch.Tensor, fmt: Format, scale: torch.Tensor, inputs: list[torch.Tensor],
                   kind: str, conv: dict | None = None, iters: int = 300, lr: float = 5e-2,
                   reg: float = 0.5, batch: int = 4, seed: int = 0,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (per weight, into ``fmt.values``) with the rounding learned against the output of
    the layer on ``inputs`` (its captured inputs: rows for a Linear, images for a Conv2d); the
    weight is ``values[code] * scale + offset`` (per row; no offset: symmetric)."""
    conv = conv or {}
    shape = weight.shape
    w = rows(weight)
    s = scale.reshape(-1, 1).float()
    o = torch.zeros_like(s) if offset is None else offset.reshape(-1, 1).float()
    values = fmt.values.float()
    w_s = (w - o) / s
    lo_code, hi_code = fmt.between(w_s)
    lo, hi = values[lo_code], values[hi_code]
    gap = hi - lo
    frac = torch.where(gap > 0, (w_s - lo) / gap.clamp(min=1e-12), torch.zeros_like(w)).clamp(0.01, 0.99)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))   # h(v) = frac
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    warmup = int(0.2 * iters)
    target_w = w.reshape(shape)
    for it in range(iters):
        picks = torch.randint(len(inputs), (min(batch, len(inputs)),), generator=gen).tolist()
        x = torch.cat([inputs[i] for i in picks])
        with torch.no_grad():
            target = layer_output(kind, conv, x, target_w)
        h = _rectified_sigmoid(v)
        w_q = ((lo + h * gap) * s + o).reshape(shape)
        loss = F.mse_loss(layer_output(kind, conv, x, w_q), target)
        if it >= warmup:
            beta = 20 + (2 - 20) * (it - warmup) / max(1, iters - warmup)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum() / h.numel() * _scale_of(target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        up = _rectified_sigmoid(v) >= 0.5
    return torch.where(up, hi_code, lo_code)


def _scale_of(target: torch.Tensor) -> float:
    """The regulariser's weight relative to the output's energy, so one ``reg`` suits every layer."""
    energy = float(target.detach().pow(2).mean())
    return energy if math.isfinite(energy) and energy > 0 else 1.0
