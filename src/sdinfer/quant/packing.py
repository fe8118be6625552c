"""Codes of any width packed into bytes: a little-endian bit stream, code after code.

``pack(codes, bits)`` takes integer codes in [0, 2^bits) and returns uint8 bytes holding
ceil(n bits / 8) of them; ``unpack(packed, bits, n)`` gives the n codes back.  Widths that divide
8 (2, 4, 8) pack whole codes per byte; others (3, 6, 12: VQ codebooks of 4096 words) straddle
bytes.  What a file stores is exactly these bytes, so its size on disk is the bits it claims.
"""

from __future__ import annotations

import torch

from ..errors import UserError

MAX_BITS = 16


def _check(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise UserError(f"codes take 1 to {MAX_BITS} bits, not {bits}")


def packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    _check(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes out of range for {bits} bits")
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-flat.numel()) % per
        grouped = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return (grouped << shifts).sum(dim=1).to(torch.uint8)
    bit_index = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> bit_index) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes (int64) held by ``packed``."""
    _check(bits)
    if packed.dtype != torch.uint8 or packed.numel() < packed_bytes(n, bits):
        raise UserError(f"packed codes hold {packed.numel()} {packed.dtype} entries, too few for {n} codes "
                        f"of {bits} bits; the quantized file is damaged: quantize the model again")
    data = packed.reshape(-1).to(torch.int64)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=data.device) * bits
        return ((data.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1)[:n]
    stream = ((data.unsqueeze(1) >> torch.arange(8, device=data.device)) & 1).reshape(-1)[: n * bits]
    weights = 2 ** torch.arange(bits, dtype=torch.int64, device=data.device)
    return (stream.reshape(n, bits) * weights).sum(dim=1)
