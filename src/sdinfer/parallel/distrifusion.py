"""DistriFusion: displaced patch parallelism for UNets (approximate after warm-up).

Li et al., "DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion Models",
CVPR 2024, Sec. 4.  The latent is split along its height into N row patches, one per rank; every
rank runs the whole UNet (weights replicated) on its patch, and the ops that look across patch
borders get what they need from the other patches:

- a Conv2d padded along the height by p > 0 rows (3x3 convs, the stride-2 downsamplers): the p
  rows above and below the patch (the neighbours' bottom and top p rows; zeros outside the
  image, as the conv's own padding), then the conv with zero padding along the width only;
- self-attention: the keys and values of every patch (this patch's fresh, the others' from a
  buffer), intercepted at the module's ``scaled_dot_product_attention`` call;
- GroupNorm: each group's mean and E[x^2] over all patches (``gn_mode`` below);
- cross-attention needs nothing (the text is replicated), nor does anything else in a UNet.
A hook on the UNet splits its input sample (already with any extra channels, such as the
default UNet's coordinates) and all-gathers the output patches at the end.

When: the first step has no previous step to reuse and is synchronous, and so are the
``warmup_steps`` steps after it (the paper's "warm-up steps", 4 by default, counted as its code
counts them: steps 0 .. warmup_steps); while every exchange is synchronous and fresh the result
is one device's up to float rounding (max abs error <= 1e-5 in float32, tested).  After warm-up
each layer uses the other patches' halos / K/V / statistics of the previous step (stale:
displaced by one step) and sends this step's with ``Communicator.start_all_gather``, waited on at
the same layer in the next step, so that communication overlaps the rest of the step's compute.
Only the output gather stays synchronous.  ``gn_mode`` after warm-up:

- ``corrected`` (the paper's corrected asynchronous GroupNorm): full = stale mean over all
  patches + (fresh local - stale local), for the mean and E[x^2] alike; where the variance this
  gives is negative, the patch's own fresh variance;
- ``stale``: the other patches' statistics of the previous step with this patch's fresh ones;
- ``sync``: GroupNorm statistics gathered synchronously (fresh) every step; halos and K/V stale.

Bytes one rank sends per model call, the same in every step (warm-up or not, any ``gn_mode``;
only when they are waited on differs); e bytes an element of the model's dtype, N ranks, B the
batch of the call (2 x prompts when guided), every exchange an all-gather of E bytes (E (N - 1)
sent, ``comm.py``):

- each Conv2d with height padding p > 0, of C input channels W wide: its input's top and bottom
  p rows, 2 p B C W (N - 1) e (a stride-2 downsampler does not use the bottom rows; they go
  along, one collective shape for every conv);
- each self-attention layer of S image tokens (over the whole image) and K/V width D (heads x
  head width): the patch's keys and values, 2 B (S / N) D (N - 1) e;
- each GroupNorm of G groups: the mean and variance of each sample and group (E[x^2] is
  var + mean^2), summed in float64 and sent in float32 whatever the model's dtype: 2 B G (N - 1) 4;
- once: the output patch, B C_out (H / N) W (N - 1) e, for an H x W latent.

On the default UNet at 64 x 64, guided (B 2), N 2, float32: 28 convs (sum of C W over them
36160), 4 self-attention layers (S 256, D 64), 30 GroupNorms (G 8), output 3 channels:
578560 + 524288 + 3840 + 49152 = 1155840 bytes a step (tested).

Quality against one device (PSNR of each GroupNorm mode and warm-up): BENCHMARKS.md,
multi-device strategies; ``corrected`` GroupNorm kept the most.  There is no seam: the loss comes
from the model deciding midway through sampling where its shapes go (at twice its training
size), which the stale steps move, grow or add one to; a warm-up over about half the steps
recovers most of it.  Fed the same input twice, a stale step equals a fresh one (tested): the
staleness is the only approximation.

Patches must line up at every level: the latent height must divide by N x 2^(levels - 1), the
UNet's total downsampling.  State (the buffers of the previous step) is kept per generation and
guidance branch, and dropped with a new generation; sdinfer's guided calls hold both branches
in one batch, which is fine: every exchange is per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..cache.base import BranchStates, CacheHandle, hidden_states_of, hook_name, map_tensors
from ..context import StepContext, current_step
from ..errors import UserError
from ..models.adapters import adapter_for, supported
from ..quant.layers import is_conv2d
from .attention import forward_with_attention
from .comm import Communicator, Pending

GN_MODES = ("corrected", "stale", "sync")
CONTROL_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                     "down_intrablock_additional_residuals")


@dataclass
class DistriFusionConfig:
    """``distrifusion``: one row patch of the latent per rank, stale neighbours after warm-up."""

    warmup_steps: int = 4        # the paper's default: synchronous steps after the first, before going stale
    gn_mode: str = "corrected"   # "corrected", "stale" or "sync" (see the module docstring)
    exact = False   # stale activations: caching them would reuse features that are stale already (as xDiT)

    def __post_init__(self) -> None:
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            raise ValueError(f"distrifusion warmup_steps (synchronous steps after the first) must be a whole "
                             f"number >= 0, got {self.warmup_steps}")
        self.warmup_steps = int(self.warmup_steps)
        if self.gn_mode not in GN_MODES:
            raise ValueError(f"distrifusion gn_mode must be one of {', '.join(GN_MODES)}, not {self.gn_mode!r}")

    def check_world_size(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"distrifusion splits the latent into one row patch per rank: it needs a world "
                             f"size of at least 2, got {size}")


# ---- the exchanges of one model call ---------------------------------------------------------
class PatchState:
    """Per generation and branch: what each layer kept from the previous call, by layer name:
    the gathered tensor of a synchronous exchange, or the all-gather still under way."""

    def __init__(self) -> None:
        self.kept: dict[str, torch.Tensor | Pending] = {}

    def drain(self) -> None:
        """Complete the all-gathers nobody will wait on (the last step's), so that none is dropped
        while under way; every rank started them, so they finish."""
        for kept in self.kept.values():
            if isinstance(kept, Pending):
                try:
                    kept.wait()
                except RuntimeError:   # a peer is gone; the run is failing anyway
                    pass
        self.kept.clear()


class PatchStates(BranchStates[PatchState]):
    """``BranchStates`` that complete the pending all-gathers of the states they drop."""

    def reset(self) -> None:
        for state in getattr(self, "states", {}).values():
            state.drain()
        super().reset()


@dataclass
class PatchCall:
    """One model call under way: this rank's patch, and whether its exchanges are fresh."""

    comm: Communicator
    state: PatchState
    fresh: bool            # warm-up: every exchange synchronous

    def exchange(self, layer: str, local: torch.Tensor, dim: int, sync: bool = False) -> torch.Tensor:
        """Every rank's ``local`` concatenated along ``dim`` in rank order: this call's (a synchronous
        all-gather) while fresh, else the previous call's, with this call's sent on its way for
        the next (its own slot then holds the previous call's ``local``)."""
        kept = self.state.kept.get(layer)
        if self.fresh or sync or kept is None:
            full = self.comm.all_gather(local, dim)
            self.state.kept[layer] = full
            return full
        full = kept.wait() if isinstance(kept, Pending) else kept
        self.state.kept[layer] = self.comm.start_all_gather(local, dim)
        return full


class ActiveCall:
    """The call the UNet hook has under way (None outside one), shared with the layer hooks."""

    def __init__(self) -> None:
        self.call: PatchCall | None = None


# ---- layer hooks -------------------------------------------------------------------------------
class HaloConvHook(ModelHook):
    """On a Conv2d padded along the height: the neighbours' edge rows stand in for the padding."""

    def __init__(self, active: ActiveCall, layer: str, pad: int):
        super().__init__()
        self.active, self.layer, self.pad = active, layer, pad

    def new_forward(self, module, x, *args, **kwargs):
        call = self.active.call
        if call is None:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        p, rows, stride = self.pad, x.shape[2], module.stride[0]
        if rows < p or rows % stride:
            raise UserError(f"distrifusion: {self.layer} gets a patch of {rows} rows, which its height padding "
                            f"{p} and stride {stride} do not fit; use a taller latent or fewer ranks")
        edges = call.exchange(self.layer, torch.stack([x[:, :, :p], x[:, :, rows - p:]]), dim=0)
        rank, n = call.comm.rank, call.comm.size
        zeros = torch.zeros_like(edges[0])
        above = edges[2 * rank - 1] if rank > 0 else zeros          # the bottom rows of the patch above
        below = edges[2 * rank + 2] if rank < n - 1 else zeros      # the top rows of the patch below
        padded = torch.cat([above, x, below], dim=2)
        return F.conv2d(padded, module.weight, module.bias, module.stride, (0, module.padding[1]),
                        module.dilation, module.groups)


class PatchGroupNormHook(ModelHook):
    """On a GroupNorm: normalise by the statistics of the whole image (``gn_mode`` after warm-up)."""

    def __init__(self, active: ActiveCall, layer: str, mode: str):
        super().__init__()
        self.active, self.layer, self.mode = active, layer, mode

    def new_forward(self, module, x, *args, **kwargs):
        call = self.active.call
        if call is None:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        b, groups = x.shape[0], module.num_groups
        xg = x.reshape(b, groups, -1).float()
        # float64 sums: the statistics then match torch's own GroupNorm to float32 rounding
        mean = xg.mean(-1, dtype=torch.float64)
        var = (xg.square().mean(-1, dtype=torch.float64) - mean.square()).clamp_min(0)
        n, rank = call.comm.size, call.comm.rank
        full = call.exchange(self.layer, torch.stack([mean, var]).float(), dim=0, sync=self.mode == "sync")
        means, variances = full.double().view(n, 2, b, groups).unbind(1)
        if call.fresh or self.mode in ("sync", "stale"):
            if not call.fresh and self.mode == "stale":
                means, variances = means.clone(), variances.clone()
                means[rank], variances[rank] = mean, var
            full_mean = means.mean(0)
            full_var = variances.mean(0) + (means - full_mean).square().mean(0)
        else:   # corrected: the stale whole-image statistics moved by this patch's change
            second = variances + means.square()
            full_mean = means.mean(0) + (mean - means[rank])
            full_second = second.mean(0) + (var + mean.square() - second[rank])
            full_var = full_second - full_mean.square()
            full_var = torch.where(full_var < 0, var, full_var)
        out = (xg - full_mean[..., None].float()) * torch.rsqrt(full_var + module.eps)[..., None].float()
        out = out.reshape(x.shape).to(x.dtype)
        if module.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            out = out * module.weight.view(shape) + module.bias.view(shape)
        return out


class PatchAttentionHook(ModelHook):
    """On a self-attention module: its queries attend to the keys and values of the whole image."""

    def __init__(self, active: ActiveCall, layer: str):
        super().__init__()
        self.active, self.layer = active, layer

    def new_forward(self, module, *args, **kwargs):
        call = self.active.call
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)

        def attend(q, k, v, scale):
            if k.shape[2] != q.shape[2]:
                raise UserError(f"distrifusion: {self.layer} is not self-attention over the patch's tokens "
                                f"({q.shape[2]} queries, {k.shape[2]} keys)")
            tokens, rank = k.shape[2], call.comm.rank
            kv = torch.stack([k, v])
            full = call.exchange(self.layer, kv, dim=3)
            full = torch.cat([full[:, :, :, :rank * tokens], kv, full[:, :, :, (rank + 1) * tokens:]], dim=3)
            return F.scaled_dot_product_attention(q, full[0], full[1], scale=scale)

        return forward_with_attention(module, self.fn_ref.original_forward, args, kwargs, attend,
                                      f"distrifusion: {self.layer}")


class PatchUNetHook(ModelHook):
    """On the UNet: run it on this rank's row patch, gather the output patches."""

    def __init__(self, active: ActiveCall, comm: Communicator, config: DistriFusionConfig, factor: int,
                 states: PatchStates):
        super().__init__()
        self.active, self.comm, self.config, self.factor, self.states = active, comm, config, factor, states

    def new_forward(self, module, *args, **kwargs):
        given = [name for name in CONTROL_RESIDUALS if kwargs.get(name) is not None]
        if given:
            raise UserError(f"distrifusion does not split ControlNet / adapter residuals ({', '.join(given)}) "
                            "yet; run without them, or use cfg parallel")
        sample = hidden_states_of(args, kwargs)
        n, height = self.comm.size, sample.shape[2]
        if height % (n * self.factor):
            raise UserError(f"distrifusion splits the latent's height into {n} row patches that the UNet "
                            f"downsamples {self.factor}x: a latent height of {height} does not divide by "
                            f"{n} x {self.factor} = {n * self.factor}; choose an image size whose latent "
                            f"height is a multiple of {n * self.factor}")
        patch = sample.chunk(n, dim=2)[self.comm.rank].contiguous()
        if args:
            args = (patch, *args[1:])
        else:
            kwargs = {**kwargs, "sample": patch}
        ctx = current_step() or StepContext(step_index=0, num_steps=0, t=float("nan"), model_t=float("nan"))
        state = self.states.get(ctx)
        self.active.call = PatchCall(self.comm, state, fresh=ctx.step_index <= self.config.warmup_steps)
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.active.call = None
        return map_tensors(lambda i, t: self.comm.all_gather(t, dim=2) if t.ndim == 4 else t, out)


# ---- installing ---------------------------------------------------------------------------------
def _height_padding(name: str, conv: torch.nn.Conv2d) -> int:
    """The conv's padding along the height, checked to split: the output of a patch of h rows
    (h a multiple of the stride) is h / stride rows, those of the same rows of the whole image."""
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"distrifusion splits convolutions padded by a number of zero rows; {name} pads "
                         f"{padding!r} ({conv.padding_mode}), which is not supported")
    span, stride, pad = conv.dilation[0] * (conv.kernel_size[0] - 1), conv.stride[0], padding[0]
    if not span - stride + 1 <= 2 * pad <= span:
        raise ValueError(f"distrifusion: {name} (kernel {conv.kernel_size[0]}, stride {stride}, padding {pad} "
                         "along the height) does not map a patch's rows onto the same rows of its output; "
                         "only 'same'-padded convs and their strided downsamplers split into patches")
    return pad


def apply_distrifusion(model: torch.nn.Module, config: DistriFusionConfig, handle: CacheHandle,
                       comm: Communicator) -> None:
    unets = supported(lambda a: a.family == "unet")
    try:
        adapter = adapter_for(model)
    except ValueError:
        adapter = None
    if adapter is None or adapter.family != "unet":
        raise ValueError(f"distrifusion splits a UNet's latent into row patches and supports "
                         f"{', '.join(unets)}; {type(model).__name__} is not one of them (for a diffusion "
                         "transformer use ulysses or ring)")
    convs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            raise ValueError(f"distrifusion does not split transposed convolutions ({name})")
        if is_conv2d(module) and (pad := _height_padding(name, module)):
            convs.append((name, module, pad))
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    attentions = [(name, m) for name, m, cross in adapter.attentions(model) if not cross]

    active, states = ActiveCall(), PatchStates(PatchState)
    handle.states.append(states)
    name = hook_name("distrifusion")
    for layer, module, pad in convs:
        handle.register(module, HaloConvHook(active, layer, pad), name)
    for layer, module in norms:
        handle.register(module, PatchGroupNormHook(active, layer, config.gn_mode), name)
    for layer, module in attentions:
        handle.register(module, PatchAttentionHook(active, layer), name)
    factor = 2 ** (len(model.down_blocks) - 1)
    # the step context outside sdinfer's loop: ``parallel.apply`` installs the step tracker
    handle.register(model, PatchUNetHook(active, comm, config, factor, states), name)

