"""One call signature for every denoiser class: ``call_denoiser(model, x, t, text)``.

diffusers model classes differ in how they take the timestep and the text
conditioning (token states only, or token states and a pooled vector), in the
extra arguments they need and in what their output holds; each family declares
that in its adapter's ``CallSignature`` (``adapters.py``) and this module reads
it, so the sampling loop, training and the accelerators see one function.
Extra input channels (the default UNet's coordinate channels), FLUX's packed
latents and learned-variance outputs are handled here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adapters import CallSignature


@dataclass
class TextConditioning:
    """A text encoder's output: per-token states and, where the encoder has one, a pooled vector."""

    states: torch.Tensor                 # (B, L, D)
    pooled: torch.Tensor | None = None   # (B, D')

    def __len__(self) -> int:
        return self.states.shape[0]


def concat_text(*items):
    """Concatenate conditionings (or plain state tensors, or Nones) along the batch."""
    if all(i is None for i in items):
        return None
    if all(isinstance(i, TextConditioning) for i in items):
        pooled = None if items[0].pooled is None else torch.cat([i.pooled for i in items])
        return TextConditioning(torch.cat([i.states for i in items]), pooled)
    return torch.cat(list(items))


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """Two channels holding each pixel's x and y in [-1, 1] (CoordConv)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(b, 2, h, w)


def extra_input_channels(model: torch.nn.Module, x: torch.Tensor) -> int:
    return int(model.config.in_channels) - x.shape[1]


def pack_latents(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p W/p, C p^2): each token one p x p patch, channels outermost."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(tokens: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // (p * p)
    return tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_position_ids(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows cols, 3) ids of packed tokens: (0, row, column), row-major."""
    ids = torch.zeros(rows, cols, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(rows, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=dtype, device=device)[None, :]
    return ids.reshape(rows * cols, 3)


def signature_of(model: torch.nn.Module) -> CallSignature:
    """The declared call signature of ``model``'s class (an undeclared class: called as a UNet)."""
    from .adapters import ADAPTERS, CallSignature   # imports diffusers: only once a model is called

    adapter = ADAPTERS.get(type(model).__name__)
    return adapter.call if adapter is not None else CallSignature(learned_variance=True)


def call_denoiser(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                  text: TextConditioning | torch.Tensor | None) -> torch.Tensor:
    """Run ``model`` on ``x`` at timesteps ``t`` (model convention) with text conditioning,
    as the model's ``CallSignature`` (``models/adapters.py``) declares."""
    name = type(model).__name__
    sig = signature_of(model)
    pooled = text.pooled if isinstance(text, TextConditioning) else None
    states = text.states if isinstance(text, TextConditioning) else text
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    p = sig.packing
    channels = x.shape[1] * p * p
    extra = int(model.config.in_channels) - channels
    model_in = x
    if extra == 2 and p == 1:
        model_in = torch.cat([x, coordinate_channels(x)], dim=1)
    elif extra != 0:
        raise ValueError(
            f"{name} takes {model.config.in_channels} input channels but the sample has "
            f"{x.shape[1]}{f' ({channels} packed)' if p > 1 else ''}; pass a sample with "
            f"{int(model.config.in_channels) // (p * p)} channels")
    kwargs = {"encoder_hidden_states": states, "return_dict": False}
    kwargs.update(sig.constants)
    if sig.pooled:
        if pooled is None:
            raise ValueError(f"{name} needs a pooled text embedding; use a text encoder with a pooled "
                             "output (e.g. CLIPTextModel)")
        kwargs[sig.pooled] = pooled
    if p > 1:
        height, width = x.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"{name} packs {p}x{p} latent patches: the latent's sides ({height}x{width}) "
                             f"must be multiples of {p}")
        model_in = pack_latents(model_in, p)
        kwargs["img_ids"] = image_position_ids(height // p, width // p, x.dtype, x.device)
        kwargs["txt_ids"] = torch.zeros(states.shape[1], 3, dtype=x.dtype, device=x.device)
    if sig.embedded_guidance is not None and getattr(model.config, "guidance_embeds", False):
        keyword, value = sig.embedded_guidance
        kwargs[keyword] = torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)
    timestep = t * sig.timestep_scale if sig.timestep_scale != 1.0 else t
    if sig.timestep == "positional":
        out = model(model_in, timestep, **kwargs)[0]
    else:
        out = model(model_in, timestep=timestep, **kwargs)[0]
    if p > 1:
        out = unpack_latents(out, p, *x.shape[-2:])
    if sig.learned_variance and out.shape[1] == 2 * x.shape[1]:  # keep the mean prediction
        out = out[:, : x.shape[1]]
    return out
