"""One attention module's ``scaled_dot_product_attention`` call, run another way.

The strategies that change what attention sees (sequence parallelism: other ranks' tokens;
DistriFusion: other patches' keys and values; PipeFusion: a K/V buffer) leave diffusers'
processors to do the projections, norms and output split, and take over only the module's one
``F.scaled_dot_product_attention`` call, under a torch function mode entered by a hook around
the module's forward (as ParaAttention does).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import UserError

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _SDPAOverride(TorchFunctionMode):
    def __init__(self, attend: Attend, where: str):
        super().__init__()
        self.attend, self.where, self.calls = attend, where, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        q, k, v, mask, dropout, causal, scale, gqa = _sdpa_arguments(*args, **kwargs)
        if mask is not None or causal or dropout or gqa or k.shape[1] != q.shape[1]:
            raise UserError(f"{self.where} takes plain attention (no mask, causal flag, dropout or grouped "
                            "heads); this call has one")
        return self.attend(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def forward_with_attention(module: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict,
                           attend: Attend, where: str):
    """``forward(*args, **kwargs)`` of an attention ``module``, its one SDPA call made by
    ``attend(q, k, v, scale)`` (q, k, v as [batch, heads, tokens, head width])."""
    with _SDPAOverride(attend, where) as mode:
        out = forward(*args, **kwargs)
    if mode.calls != 1:
        raise UserError(f"{where} ran {mode.calls} scaled_dot_product_attention calls, not one; it needs an "
                        f"SDPA processor (AttnProcessor2_0, JointAttnProcessor2_0), not "
                        f"{type(getattr(module, 'processor', None)).__name__}")
    return out
