"""Number formats for quantized weights and activations: each a table of the values its codes
stand for, before the per-channel (or per-tensor) scale.

``int_format(bits)``: two's-complement integers -2^(b-1) .. 2^(b-1)-1 (round to nearest with a
symmetric scale is the classic RTN).  ``fp_format(exponent, mantissa)``: sign, E exponent bits
and M mantissa bits with subnormals and no codes reserved for inf / NaN (as OCP's FP4 E2M1 and
FP6), the exponent bias 2^(E-1) - 1; a different bias is the same table times a power of two,
which the scale absorbs, so searching the scale's maximum covers it.  ``fp_candidates("fp4")``
lists the exponent / mantissa splits a format name allows (what LBQ searches per layer).

A format rounds to nearest (``nearest``) or gives the two neighbours of each value (``between``:
what learned rounding chooses from).  Codes are indices into the sorted table ``values``; the
table is stored with the codes, so a file names its own formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

# the exponent / mantissa splits each FP width allows (sign bit apart), tried in this order
FP_SPLITS = {
    "fp8": ((4, 3), (5, 2), (3, 4)),
    "fp6": ((2, 3), (3, 2)),
    "fp4": ((2, 1), (1, 2), (3, 0)),
}
INT_WIDTHS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}


@dataclass(frozen=True)
class Format:
    """A table of representable values (sorted ascending) and the bits a code takes."""

    name: str            # "int4", "fp4_e2m1", "vq" ...
    bits: int
    values: torch.Tensor  # (2^bits,) float32, sorted; duplicate values (+0, -0) are harmless

    @property
    def max(self) -> float:
        """The largest magnitude both signs reach (7 for int4, whose table runs -8 .. 7)."""
        return float(min(-self.values[0], self.values[-1]))

    def _midpoints(self, like: torch.Tensor) -> torch.Tensor:
        v = self.values.to(like.device, torch.float32)
        return (v[1:] + v[:-1]) / 2

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The code (index into ``values``) of the value nearest each element of ``x`` (already
        divided by its scale); values beyond the table clamp to its ends."""
        return torch.bucketize(x.float().contiguous(), self._midpoints(x))

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the nearest value of the table (fake quantization, scale applied outside)."""
        return self.values.to(x.device)[self.nearest(x)].to(x.dtype)

    def between(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (below, above) of the table values around each element: equal at the ends, where
        ``x`` lies beyond the table."""
        v = self.values.to(x.device, torch.float32)
        above = torch.bucketize(x.float().contiguous(), v).clamp(max=len(v) - 1)
        below = (above - 1).clamp(min=0)
        exact_or_below = v[above] <= x.float()
        below = torch.where(exact_or_below, above, below)
        return below, above

    def step_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Half the gap between the table values around each element of ``x``: the most rounding
        to nearest moves it (inside the table's range)."""
        below, above = self.between(x)
        v = self.values.to(x.device, torch.float32)
        return (v[above] - v[below]) / 2


def int_format(bits: int) -> Format:
    if not 2 <= bits <= 8:
        raise UserError(f"integer formats take 2 to 8 bits, not {bits}")
    half = 2 ** (bits - 1)
    return Format(f"int{bits}", bits, torch.arange(-half, half, dtype=torch.float32))


def fp_format(exponent: int, mantissa: int) -> Format:
    """Sign + ``exponent`` + ``mantissa`` bits, subnormals, every code finite, bias 2^(E-1) - 1."""
    if exponent < 0 or mantissa < 0 or exponent + mantissa < 1 or exponent + mantissa > 7:
        raise UserError(f"an FP format needs 1 to 7 exponent + mantissa bits, not E{exponent}M{mantissa}")
    bias = 2 ** (exponent - 1) - 1 if exponent > 0 else 0
    magnitudes = []
    for e in range(2 ** exponent):
        for m in range(2 ** mantissa):
            frac = m / 2 ** mantissa
            magnitudes.append(2.0 ** (1 - bias) * frac if e == 0 else 2.0 ** (e - bias) * (1 + frac))
    mags = torch.tensor(magnitudes, dtype=torch.float32)
    values = torch.sort(torch.cat([-mags, mags])).values
    return Format(f"fp{1 + exponent + mantissa}_e{exponent}m{mantissa}", 1 + exponent + mantissa, values)


def fp_candidates(name: str) -> list[Format]:
    """The FP formats of width ``name`` ("fp4", "fp6", "fp8") LBQ searches, or the one named
    ("fp4_e2m1")."""
    name = name.lower()
    if name in FP_SPLITS:
        return [fp_format(e, m) for e, m in FP_SPLITS[name]]
    if name.startswith("fp") and "_e" in name:
        width, _, split = name.partition("_e")
        exponent, _, mantissa = split.partition("m")
        try:
            fmt = fp_format(int(exponent), int(mantissa))
        except ValueError:
            fmt = None
        if fmt is not None and fmt.name == name:
            return [fmt]
    raise UserError(f"unknown floating-point format {name!r}; give fp4, fp6 or fp8 (searched per layer) "
                    "or one split such as fp4_e2m1, fp8_e4m3")


def named_format(name: str) -> Format:
    """One format by name: int2..int8 or an FP split (``fp8_e4m3``); a bare width (``fp8``) is
    its first split."""
    name = name.lower()
    if name in INT_WIDTHS:
        return int_format(INT_WIDTHS[name])
    if name.startswith("fp"):
        return fp_candidates(name)[0]
    raise UserError(f"unknown number format {name!r}; known: {', '.join(INT_WIDTHS)}, "
                    f"{', '.join(FP_SPLITS)} or a split such as fp4_e2m1")


def table_format(name: str, values: torch.Tensor) -> Format:
    """A format rebuilt from a stored table (the file keeps the table, not only the name)."""
    n = int(values.shape[0])
    bits = max(1, (n - 1).bit_length())
    return Format(name, bits, values.float())
