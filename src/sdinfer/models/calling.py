"""One call signature for every denoiser class: ``call_denoiser(model, x, t, text)``.

diffusers model classes differ in how they take the timestep and the text
conditioning (token states only, or token states and a pooled vector); this
module hides that so the sampling loop, training and the accelerators see one
function.  Extra input channels (the default UNet's coordinate channels) and
learned-variance outputs are handled here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def call_denoiser(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                  text: TextConditioning | torch.Tensor | None) -> torch.Tensor:
    """Run ``model`` on ``x`` at timesteps ``t`` (model convention) with text conditioning."""
    name = type(model).__name__
    pooled = text.pooled if isinstance(text, TextConditioning) else None
    states = text.states if isinstance(text, TextConditioning) else text
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    extra = extra_input_channels(model, x)
    model_in = x
    if extra == 2:
        model_in = torch.cat([x, coordinate_channels(x)], dim=1)
    elif extra != 0:
        raise ValueError(
            f"{name} takes {model.config.in_channels} input channels but the sample has "
            f"{x.shape[1]}; pass a sample with {model.config.in_channels} channels")
    if name == "UNet2DConditionModel":
        out = model(model_in, t, encoder_hidden_states=states, return_dict=False)[0]
    elif name == "PixArtTransformer2DModel":
        out = model(model_in, encoder_hidden_states=states, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
    elif name == "SD3Transformer2DModel":
        if pooled is None:
            raise ValueError("SD3Transformer2DModel needs a pooled text embedding; use a text "
                             "encoder with a pooled output (e.g. CLIPTextModel)")
        out = model(model_in, encoder_hidden_states=states, pooled_projections=pooled,
                    timestep=t, return_dict=False)[0]
    else:
        out = model(model_in, t, encoder_hidden_states=states, return_dict=False)[0]
    if out.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean prediction
        out = out[:, : x.shape[1]]
    return out
