"""LinFusion (Liu, Yu, Tan, Wang et al., "LinFusion: 1 GPU, 1 Minute, 16K Image", 2024).

Every self-attention of a UNet (``attn1`` of each BasicTransformerBlock; cross-attention is left
alone) is replaced by a generalized linear attention, non-causal and normalization-aware, O(n) in
the number of tokens n in both time and memory:

    q = W_q (x + f_q(x)),   k = W_k (x + f_k(x)),   v = W_v x
    phi(z) = elu(z) + 1
    out_i = phi(q_i) (sum_j phi(k_j)^T v_j / n) / (phi(q_i) . (sum_j phi(k_j) / n) + 1e-4)

per head, then the original output projection W_o.  f (LinFusion's "projection_mid_dim" MLP) is
Linear - LayerNorm - LeakyReLU - Linear; its last Linear starts at zero, so f(x) = 0 at the start
and the module starts as the plain linear attention with the original projections.  Dividing both
sums by n keeps the numerator and denominator on one scale whatever the resolution (the paper's
normalization-aware attention); the kernel phi is positive, so the denominator never vanishes.

The modules (their own copies of W_q, W_k, W_v, W_o, initialized from the original attention,
and f_q, f_k) are trained by distillation from the model itself (``linfusion_train``:
``sdinfer distill linfusion --model MODEL``) and kept beside the model
(``MODEL/sdinfer_calibration/linfusion.safetensors``: per layer its tensors, JSON metadata naming
the model class, the layers, their widths and heads, the MLP's mid width and the training steps).
``sdinfer.accelerate(pipe, "linfusion")`` mounts them by a diffusers hook on each self-attention
module, which runs the linear attention in place of the module's forward; the model's own weights
and processors are untouched, so ``handle.remove()`` restores it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from ..cache.base import CacheConfig, CacheHandle, hook_name
from ..errors import UserError
from ..models import artifacts
from ..models.adapters import adapter_for

METHOD = "linfusion"
KIND = "linfusion"
DISTILL = "sdinfer distill linfusion --model MODEL"
EPS = 1e-4


@dataclass
class LinFusionConfig(CacheConfig):
    weights: str = ""      # a linfusion.safetensors file; empty: the one beside the model
    # CFG parallel: each rank's branch runs the same layers; a sequence-parallel strategy would need the
    # linear attention's sums over the tokens all-reduced (and shards a DiT, which LinFusion is not for)
    exact_parallel = ("cfg",)


# ---- the linear attention ------------------------------------------------------------------
def phi(z: torch.Tensor) -> torch.Tensor:
    """LinFusion's kernel: elu(z) + 1 (positive everywhere)."""
    return F.elu(z) + 1


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Normalization-aware linear attention on (B, heads, n, d) tensors, O(n):
    phi(q) (phi(k)^T v / n) / (phi(q) . mean_n phi(k) + 1e-4)."""
    dtype = q.dtype
    q, k, v = phi(q.float()), phi(k.float()), v.float()
    n = k.shape[-2]
    kv = torch.matmul(k.transpose(-1, -2), v) / n                  # (B, h, d, d_v)
    k_mean = k.mean(dim=-2, keepdim=True)                          # (B, h, 1, d)
    denominator = (q * k_mean).sum(dim=-1, keepdim=True) + EPS     # (B, h, n, 1)
    return (torch.matmul(q, kv) / denominator).to(dtype)


class Refiner(nn.Module):
    """f: Linear - LayerNorm - LeakyReLU - Linear, the last Linear zero (f(x) = 0 at the start)."""

    def __init__(self, dim: int, mid: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, mid)
        self.norm = nn.LayerNorm(mid)
        self.act = nn.LeakyReLU()
        self.fc2 = nn.Linear(mid, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight.float())
        if linear.bias is not None:
            new.bias.copy_(linear.bias.float())
    return new


class LinearSelfAttention(nn.Module):
    """The linear stand-in of one diffusers self-attention module (its own projections, copied
    from the original at creation, and the refiners f_q, f_k)."""

    def __init__(self, dim: int, inner: int, heads: int, mid: int, out_dim: int | None = None):
        super().__init__()
        self.dim, self.inner, self.heads, self.mid = dim, inner, heads, mid
        out_dim = dim if out_dim is None else out_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, out_dim)
        self.f_q = Refiner(dim, mid)
        self.f_k = Refiner(dim, mid)

    @classmethod
    def from_attention(cls, attn: nn.Module, mid: int) -> "LinearSelfAttention":
        dim, inner = attn.to_q.in_features, attn.to_q.out_features
        module = cls(dim, inner, attn.heads, mid, attn.to_out[0].out_features)
        for name in ("to_q", "to_k", "to_v"):
            setattr(module, name, _copy_linear(getattr(attn, name)))
        module.to_out = _copy_linear(attn.to_out[0])
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) tokens -> (B, n, out_dim): the attention and its output projection."""
        b, n, _ = x.shape
        q = self.to_q(x + self.f_q(x))
        k = self.to_k(x + self.f_k(x))
        v = self.to_v(x)
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)
        out = linear_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.inner))


def run_in_place_of(attn: nn.Module, linear: LinearSelfAttention, hidden_states: torch.Tensor) -> torch.Tensor:
    """What the diffusers attention module ``attn`` would return on a self-attention call, with
    ``linear`` for its projections and attention (its norms, residual and rescale kept)."""
    residual = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        raise UserError(f"{METHOD} does not handle attention with a spatial norm (a VAE's attention)")
    four_d = hidden_states.ndim == 4
    if four_d:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    dtype = hidden_states.dtype
    out = linear(hidden_states.to(linear.to_q.weight.dtype)).to(dtype)
    out = attn.to_out[1](out)   # dropout
    if four_d:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


class LinFusionHook(ModelHook):
    """On one self-attention module: the linear attention runs in place of the module's forward."""

    def __init__(self, linear: LinearSelfAttention, where: str):
        super().__init__()
        self.linear, self.where = linear, where

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise UserError(f"{self.where}: {METHOD} replaces self-attention without a mask; this call "
                            "has text states or an attention mask")
        weight = self.linear.to_q.weight
        if weight.device != hidden_states.device:
            self.linear.to(hidden_states.device)
        return run_in_place_of(module, self.linear, hidden_states)


# ---- the layers ----------------------------------------------------------------------------
def self_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the UNet's self-attention modules, or a UserError naming what to use."""
    name = type(model).__name__
    try:
        adapter = adapter_for(model)
    except ValueError:
        adapter = None
    if adapter is None or adapter.family != "unet":
        raise UserError(f"{METHOD} replaces a UNet's self-attention; this model is a {name}, not a UNet "
                        "(use ditfastattn for a DiT's attention)")
    found = [(n, m) for n, m, cross in adapter.attentions(model) if not cross]
    if not found:
        raise UserError(f"{METHOD} replaces a UNet's self-attention; this {name} has none in its blocks "
                        "(all its attention is cross-attention), so there is nothing to replace")
    return found


def shape_of(attn: nn.Module) -> list[int]:
    """(input width, inner width, heads, output width) of an attention module."""
    return [attn.to_q.in_features, attn.to_q.out_features, int(attn.heads), attn.to_out[0].out_features]


def build_modules(model: nn.Module, mid: int | None = None) -> dict[str, LinearSelfAttention]:
    """Fresh linear stand-ins of every self-attention layer (initialized from the originals)."""
    return {name: LinearSelfAttention.from_attention(attn, mid or default_mid(attn))
            for name, attn in self_attention_layers(model)}


def default_mid(attn: nn.Module) -> int:
    """The refiner's mid width: the attention's input width (LinFusion uses a fixed 128 on SD)."""
    return attn.to_q.in_features


def mount(model: nn.Module, modules: dict[str, LinearSelfAttention], handle: CacheHandle) -> None:
    """Hook each self-attention of ``model`` to run its linear stand-in (``handle.remove()`` undoes)."""
    name = hook_name(METHOD)
    for where, attn in self_attention_layers(model):
        handle.register(attn, LinFusionHook(modules[where], where), name)


# ---- the file ------------------------------------------------------------------------------
def save(file: str | Path, model: nn.Module, modules: dict[str, LinearSelfAttention], steps: int,
         extra: dict | None = None) -> Path:
    tensors = {f"{where}.{k}": v for where, m in modules.items() for k, v in m.state_dict().items()}
    any_module = next(iter(modules.values()))
    metadata = {"method": METHOD, "model_class": type(model).__name__, "layers": list(modules),
                "shapes": {where: [m.dim, m.inner, m.heads, m.to_out.out_features] for where, m in modules.items()},
                "mid_dim": any_module.mid, "training_steps": steps, **(extra or {})}
    return artifacts.write(file, tensors, metadata)


def weights_file(model: nn.Module, config: LinFusionConfig) -> Path:
    if config.weights:
        return Path(config.weights)
    folder = artifacts.model_folder(model)
    found = artifacts.find(folder, KIND)
    if found is None:
        where = artifacts.path(folder, KIND) if folder is not None else "MODEL/sdinfer_calibration/linfusion.safetensors"
        raise artifacts.MissingArtifact(
            f"no {METHOD} weights for this {type(model).__name__} (looked for {where}); train them with "
            f"`{DISTILL}`, or pass {METHOD}:weights=FILE")
    return found


def load(model: nn.Module, file: str | Path) -> dict[str, LinearSelfAttention]:
    """The linear stand-ins in ``file``, checked against ``model``'s self-attention layers."""
    tensors, meta = artifacts.read(file, f"{METHOD} weights", DISTILL,
                                   json_keys=("layers", "shapes", "mid_dim", "training_steps"))
    layers = self_attention_layers(model)
    kind = type(model).__name__
    if meta.get("method") != METHOD or "layers" not in meta or "shapes" not in meta:
        raise UserError(f"{file} is not a {METHOD} weights file; make one with `{DISTILL}`")
    names = [n for n, _ in layers]
    if meta.get("model_class") != kind or meta["layers"] != names:
        raise UserError(f"{file} holds {METHOD} weights for other layers ({meta.get('model_class')}: "
                        f"{len(meta['layers'])} layers, e.g. {meta['layers'][:1]}) than this {kind} "
                        f"({len(names)} self-attention layers); train them for this model with `{DISTILL}`")
    modules = {}
    for where, attn in layers:
        if meta["shapes"][where] != shape_of(attn):
            raise UserError(f"{file}: layer {where} was trained for shape {meta['shapes'][where]} (in, inner, "
                            f"heads, out) and this model's is {shape_of(attn)}; train them for this model "
                            f"with `{DISTILL}`")
        dim, inner, heads, out = shape_of(attn)
        module = LinearSelfAttention(dim, inner, heads, int(meta["mid_dim"]), out)
        state = {k[len(where) + 1:]: v for k, v in tensors.items() if k.startswith(where + ".")}
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{file}: layer {where}'s tensors do not fit ({str(err).splitlines()[0]}); "
                            f"train them again with `{DISTILL}`") from None
        modules[where] = module.to(attn.to_q.weight.device).eval().requires_grad_(False)
    return modules


def apply_linfusion(model: nn.Module, config: LinFusionConfig, handle: CacheHandle) -> None:
    """Mount the trained linear attention on every self-attention layer of the UNet ``model``."""
    self_attention_layers(model)   # a DiT or a UNet without self-attention: the clear error first
    modules = load(model, weights_file(model, config))
    dtype = next(model.parameters()).dtype
    for module in modules.values():
        module.to(dtype)
    mount(model, modules, handle)
