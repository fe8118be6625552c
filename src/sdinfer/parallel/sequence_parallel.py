"""Sequence parallelism for diffusion transformers: Ulysses and ring attention (exact).

The image tokens are split along the sequence, one contiguous shard per rank, from the
patch embedding to the final projection (the modules the model adapter names in
``ModelAdapter.image_tokens``); every op between them is token-local (norms, MLPs,
adaLN modulation, cross-attention to the text), so only attention over the image tokens
communicates.  The text tokens of an MM-DiT's joint attention stay replicated on every rank.
Attention is intercepted at its ``scaled_dot_product_attention`` call (a hook on each
self- / joint-attention module runs it under a torch function mode, as ParaAttention does),
so diffusers' own processors keep doing the projections, norms and the split of the joint
output.

- **Ulysses** (DeepSpeed-Ulysses; Jacobs et al., "DeepSpeed Ulysses: System Optimizations for
  Enabling Training of Extreme Long Sequence Transformer Models", 2023, Sec. 3): an
  all-to-all turns q, k, v from sequence-sharded [B, H, S/N, D] into head-sharded
  [B, H/N, S, D]; full-sequence attention runs on H/N heads; an all-to-all turns the output
  back.  Joint attention (text replicated, as xDiT / yunchang's "rear" joint strategy): each rank
  takes its H/N heads of the text q, k, v locally, appends them to the full image sequence, and
  all-gathers the text rows of the output over the heads.  The heads must divide by N.
- **Ring** (Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context",
  ICLR 2024; the online softmax of Milakov & Gimelshein 2018): each rank keeps its queries
  (its image shard and, for joint attention, all text tokens); the image K/V blocks travel
  around the ring in N - 1 shifts, each overlapped with attention on the block at hand, and
  the partial outputs merge by their log-sum-exp.  The replicated text K/V join the local
  block, so they are counted once and never sent.

Bytes one rank sends per model call (float32: 4 bytes an element; B the batch of the call,
H heads, D head width, S image tokens, T text tokens (0 for self-attention), N ranks,
L attention layers over the image tokens, P the width of the final projection's output
(patch_size^2 x out_channels)):

- Ulysses, per layer: q, k, v and out all-to-all'd: 4 (B H S/N D) (N - 1) / N elements;
  for joint attention also the text rows of the output, all-gathered: (B H/N T D) (N - 1).
- Ring, per layer: K and V image blocks, N - 1 shifts: 2 (B H S/N D) (N - 1).
- Both, once per call: the final projection's output all-gathered: (B S/N P) (N - 1).

Exact: the result equals one device's up to float rounding (max abs error <= 1e-5 in float32,
tested); nothing is stale or approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..cache.base import CacheHandle, hidden_states_of, hook_name
from ..errors import UserError
from ..models.adapters import adapter_for, supported
from .attention import forward_with_attention
from .comm import Communicator


@dataclass
class SequenceParallelConfig:
    """Any world size: what must divide by it (heads, image tokens) is checked on the model."""

    exact = True   # every rank computes what one device would: the caches may run under it

    def check_world_size(self, size: int) -> None:
        return None


@dataclass
class UlyssesConfig(SequenceParallelConfig):
    """``ulysses``: all-to-all between sequence and head sharding around each attention."""


@dataclass
class RingConfig(SequenceParallelConfig):
    """``ring``: K/V blocks passed around the ranks, partial attentions merged."""


# ---- attention over the image tokens of all ranks ---------------------------------------
def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Softmax attention and its log-sum-exp per query row (float32), for merging blocks."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale)
        return out, lse.float()
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    lse = scores.logsumexp(dim=-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _merge(out, lse, block_out, block_lse):
    new_lse = torch.logaddexp(lse, block_lse)
    merged = out * (lse - new_lse).exp()[..., None] + block_out.float() * (block_lse - new_lse).exp()[..., None]
    return merged, new_lse


def ring_attention(comm: Communicator, q, k, v, image_tokens: int, scale: float) -> torch.Tensor:
    """Attention of this rank's queries over every rank's image K/V (and the replicated text K/V)."""
    pending = comm.start_ring_shift(torch.stack([k[:, :, :image_tokens], v[:, :, :image_tokens]]))
    block_out, lse = attention_with_lse(q, k, v, scale)   # the own image block and the text
    out = block_out.float()
    for shift in range(comm.size - 1):
        kv = pending.wait()
        if shift < comm.size - 2:
            pending = comm.start_ring_shift(kv)
        out, lse = _merge(out, lse, *attention_with_lse(q, kv[0], kv[1], scale))
    return out.to(q.dtype)


def _to_heads(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """[B, H, S/N, D] (a sequence shard of all heads) -> [B, H/N, S, D] (all tokens of H/N heads)."""
    b, h, s, d = x.shape
    parts = comm.all_to_all(x.reshape(b, comm.size, h // comm.size, s, d).transpose(0, 1))
    return parts.permute(1, 2, 0, 3, 4).reshape(b, h // comm.size, comm.size * s, d)


def _to_sequence(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """[B, H/N, S, D] -> [B, H, S/N, D], the inverse of ``_to_heads``."""
    b, h, s, d = x.shape
    parts = comm.all_to_all(x.reshape(b, h, comm.size, s // comm.size, d).permute(2, 0, 1, 3, 4))
    return parts.transpose(0, 1).reshape(b, comm.size * h, s // comm.size, d)


def ulysses_attention(comm: Communicator, q, k, v, image_tokens: int, scale: float) -> torch.Tensor:
    """Image q, k, v to head shards (one all-to-all for the three), attention over all tokens on
    this rank's heads (with their replicated text tokens), the output back to the sequence shard
    (a second all-to-all) and the text rows all-gathered over the heads."""
    n, text_tokens = comm.size, q.shape[2] - image_tokens
    mine = slice(comm.rank * q.shape[1] // n, (comm.rank + 1) * q.shape[1] // n)
    image_qkv = _to_heads(comm, torch.cat([x[:, :, :image_tokens] for x in (q, k, v)])).chunk(3)
    q_h, k_h, v_h = (torch.cat([part, x[:, mine, image_tokens:]], dim=2) for part, x in zip(image_qkv, (q, k, v)))
    out = F.scaled_dot_product_attention(q_h, k_h, v_h, scale=scale)
    image_out = _to_sequence(comm, out[:, :, :out.shape[2] - text_tokens])
    if not text_tokens:
        return image_out
    return torch.cat([image_out, comm.all_gather(out[:, :, out.shape[2] - text_tokens:], dim=1)], dim=2)


# ---- hooks ----------------------------------------------------------------------------------
class DistributedAttentionHook(ModelHook):
    """On a self- or joint-attention module: its attention runs over the image tokens of all ranks."""

    def __init__(self, attend: Callable, comm: Communicator, name: str):
        super().__init__()
        self.attend, self.comm, self.name = attend, comm, name

    def new_forward(self, module, *args, **kwargs):
        tokens = hidden_states_of(args, kwargs).shape[1]

        def attend(q, k, v, scale):
            if q.shape[2] < tokens or q.shape[2] != k.shape[2]:
                raise UserError(f"{self.name}: queries and keys of {q.shape[2]} and {k.shape[2]} tokens do not "
                                f"hold this rank's {tokens} image tokens first; sequence parallelism "
                                "supports self-attention and joint attention with the text last")
            return self.attend(self.comm, q, k, v, tokens, scale)

        return forward_with_attention(module, self.fn_ref.original_forward, args, kwargs, attend, self.name)


class ShardTokensHook(ModelHook):
    """After the patch embedding: keep this rank's contiguous shard of the image tokens."""

    def __init__(self, comm: Communicator, method: str):
        super().__init__()
        self.comm, self.method = comm, method

    def post_forward(self, module, output):
        tokens = output.shape[1]
        if tokens % self.comm.size:
            raise UserError(f"{self.method} splits the image tokens evenly over the ranks: {tokens} tokens "
                            f"do not divide by {self.comm.size} ranks; choose an image size whose token "
                            f"count ({tokens} here) is a multiple of the world size")
        return output.chunk(self.comm.size, dim=1)[self.comm.rank]


class GatherTokensHook(ModelHook):
    """After the final projection: every rank's tokens, in order, for unpatchifying."""

    def __init__(self, comm: Communicator):
        super().__init__()
        self.comm = comm

    def post_forward(self, module, output):
        return self.comm.all_gather(output, dim=1)


def _attention_layers(model: torch.nn.Module, method: str) -> list[tuple[str, torch.nn.Module]]:
    adapter = adapter_for(model)
    if not adapter.image_tokens:
        names = supported(lambda a: bool(a.image_tokens))
        raise ValueError(f"{method} shards a diffusion transformer's image tokens and supports "
                         f"{', '.join(names)}; {type(model).__name__} is not one of them")
    return [(name, module) for name, module, cross in adapter.attentions(model) if not cross]


def _apply(model: torch.nn.Module, handle: CacheHandle, comm: Communicator, method: str,
           attend: Callable) -> None:
    layers = _attention_layers(model, method)
    first, last = adapter_for(model).image_tokens
    name = hook_name(method)
    handle.register(model.get_submodule(first), ShardTokensHook(comm, method), name)
    handle.register(model.get_submodule(last), GatherTokensHook(comm), name)
    for layer, module in layers:
        handle.register(module, DistributedAttentionHook(attend, comm, f"{method} attention {layer}"), name)


def apply_ulysses(model: torch.nn.Module, config: UlyssesConfig, handle: CacheHandle,
                  comm: Communicator) -> None:
    for layer, module in _attention_layers(model, "ulysses"):
        if module.heads % comm.size:
            raise ValueError(f"ulysses splits the attention heads over the ranks: {layer} has {module.heads} "
                             f"heads, which do not divide by {comm.size} ranks; use a world size that "
                             f"divides {module.heads}, or ring")
    _apply(model, handle, comm, "ulysses", ulysses_attention)


def apply_ring(model: torch.nn.Module, config: RingConfig, handle: CacheHandle, comm: Communicator) -> None:
    _apply(model, handle, comm, "ring", ring_attention)

