"""Prediction (not measured): the speed-up of sdinfer's multi-device strategies at 2, 4 and 8 GPUs
for full-size SDXL and FLUX.1-dev, on NVLink and on PCIe, from counted compute and communication.

    python bench/parallel_scaling.py     # writes bench/results/parallel_scaling.{md,json}, prints the tables

No GPU is timed here.  The models are built with their published configs on the meta device (no
weights, no memory), one denoiser call is run under a FLOP counter, and a time model turns FLOPs
and bytes into seconds:

1. Compute.  Every matmul and convolution is counted with ``torch.utils.flop_counter``'s formulas;
   every ``scaled_dot_product_attention`` call is intercepted (a ``TorchFunctionMode`` that records
   its shapes and returns an empty result) and counted analytically as 4 B H Sq Sk D FLOPs (QK^T
   and PV), so attention can be split the way each strategy splits it.  Elementwise ops, norms and
   softmax are not counted (memory-bound; MFU absorbs them).  The work each device does is the
   work on the shapes it sees: a patch of the latent (DistriFusion), a shard of the image tokens
   with the text tokens replicated (Ulysses, ring), a contiguous run of blocks (AsyncDiff,
   PipeFusion), half the batch (CFG parallel); the non-attention FLOPs of a patch / shard come from
   two counted calls (whole and half the rows: they are affine in the rows, see ``Sharded``).
2. Communication.  Per step and per device, the bytes sent by the formulas in the docstrings of
   ``src/sdinfer/parallel/*.py``, with the tensor sizes read off the counted call (attention
   shapes, convolution inputs, GroupNorm groups, block outputs); bfloat16 activations.
3. Time.  t_compute = FLOPs / (peak x MFU).  A collective costs alpha + wire bytes / link
   bandwidth, the wire bytes being what the busiest device puts on its link with a bandwidth-
   optimal algorithm (all-gather (N-1) E, all-to-all E (N-1)/N, ring shift / send E, broadcast E
   (pipelined)).  Exact synchronous strategies (cfg, Ulysses): t = t_compute + t_comm.  Ring
   attention overlaps each K/V shift with attention on the block at hand.  Stale/asynchronous
   strategies (DistriFusion, PipeFusion, AsyncDiff): t = max(t_compute, t_hidden_comm) + the
   communication they wait for at once, plus their synchronous warm-up steps amortised over the
   generation (sdinfer's PipeFusion also idles (N - 1) of M + N - 1 patch slots a step, as its
   pipeline drains before the sampler).  Speed-up = steps x t(1) / the generation's time on N.

Everything it prints is a prediction under the assumptions listed in ``ASSUMPTIONS`` (and in the
markdown it writes); the papers' reported figures are set next to it, never mixed into it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from sdinfer.parallel.asyncdiff import balanced_split, make_plan
from sdinfer.parallel.pipefusion import stage_blocks

RESULTS = Path(__file__).resolve().parent / "results"

# ---- assumptions -------------------------------------------------------------------------------
MFU = 0.4                   # model FLOPs utilisation, the same on every shape and device count
BYTES = 2                   # bfloat16 activations on the wire
STATS_BYTES = 4             # GroupNorm statistics travel in float32


@dataclass(frozen=True)
class GPU:
    name: str
    peak: float             # dense bf16 tensor FLOP/s
    nvlink: float           # NVLink bytes/s per direction per GPU


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float        # bytes/s per direction per GPU
    alpha: float            # seconds per collective (launch + latency)


GPUS = {"H100": GPU("H100 SXM", 989e12, 450e9), "A100": GPU("A100 SXM", 312e12, 300e9)}
NVLINK_ALPHA = 10e-6
PCIE = Link("PCIe 4.0 x16", 25e9, 20e-6)   # effective; PCIe 5.0 x16 would be about twice


def links(gpu: GPU) -> list[Link]:
    return [Link("NVLink", gpu.nvlink, NVLINK_ALPHA), PCIE]


STEPS = {"sdxl": 50, "flux": 28, "sd21": 50}   # SDXL / SD 2.1: 50-step DDIM; FLUX.1-dev: 28 steps
WARMUP = {"distrifusion": 4, "pipefusion": 1, "asyncdiff": 1}   # synchronous steps before the stale ones
WORLD = (2, 4, 8)

ASSUMPTIONS = [
    f"Compute: t = FLOPs / (peak x MFU), MFU = {MFU} for every shape and device count (a smaller "
    "per-device share usually runs at a lower MFU, so the predictions lean optimistic at N = 8); "
    "peaks: H100 SXM 989 TFLOP/s, A100 SXM 312 TFLOP/s dense bf16.",
    "FLOPs: matmuls and convolutions by torch's FlopCounterMode, attention analytically "
    "(4 B H Sq Sk D); elementwise ops, norms and softmax not counted.",
    f"Links: NVLink {GPUS['H100'].nvlink / 1e9:.0f} GB/s per direction per GPU (H100), "
    f"{GPUS['A100'].nvlink / 1e9:.0f} GB/s (A100), alpha {NVLINK_ALPHA * 1e6:.0f} us per collective; "
    f"{PCIE.name} {PCIE.bandwidth / 1e9:.0f} GB/s per direction per GPU (effective; PCIe 5.0 about "
    f"twice), alpha {PCIE.alpha * 1e6:.0f} us; no contention beyond each GPU's own link (GPUs behind "
    "one PCIe host bridge share it: PCIe figures lean optimistic).  The PCIe rows keep the GPU's "
    "compute and change the link only (an H100 PCIe card has a lower peak, 756 TFLOP/s).",
    f"Activations bf16 ({BYTES} bytes), GroupNorm statistics float32.",
    "Collective time: alpha + bytes on the busiest device's link (all-gather (N-1) E, all-to-all "
    "E (N-1)/N, ring shift and send E, broadcast E as a pipelined ring).",
    "Exact synchronous (cfg, Ulysses): t = t_compute(per device) + t_comm.  Ring: per attention "
    "layer t = attention on the own block + (N-1) max(attention on a remote block, K/V shift); "
    "the rest of the layer is not overlapped.  Stale (DistriFusion, PipeFusion, AsyncDiff): "
    "t = max(t_compute, hidden comm) + comm waited for at once; warm-up steps synchronous "
    f"(DistriFusion {WARMUP['distrifusion']}: patch compute + all comm; PipeFusion "
    f"{WARMUP['pipefusion']}: the whole model stage after stage; AsyncDiff {WARMUP['asyncdiff']}: each "
    f"rank runs the whole model), amortised over {STEPS['sdxl']} steps (SDXL) / {STEPS['flux']} (FLUX).  "
    "sdinfer's PipeFusion drains its pipeline every step: M + N - 1 patch slots of the slowest stage "
    "(M = N patches); the paper's pipeline flows into the next step (fill paid once).",
    "Speed-up against one device running the same call (batch 2 for guided SDXL, batch 1 for "
    "guidance-distilled FLUX.1-dev) at the same MFU; the text encoders, VAE and sampler are left "
    "out (the papers' end-to-end figures include some of them).",
]

CAVEATS = [
    "FLUX: sdinfer's ulysses, ring and pipefusion do not run on FluxTransformer2DModel today (its adapter "
    "declares no image_tokens, and FLUX puts the text tokens first in its joint attention, where "
    "sequence_parallel.py expects them last); the FLUX rows predict what the docstrings' formulas would give "
    "once supported.",
    "asyncdiff is sdinfer's split by the adapter's blocks: SDXL has 7 (3 down, mid, 3 up), so it cannot "
    "run on 8 ranks and its components are uneven; the layer split is the paper's granularity.",
    "Stale strategies trade quality for speed (DistriFusion, PipeFusion, AsyncDiff): this file predicts "
    "speed only.",
    "Not modelled: kernel efficiency falling with the per-device share, NCCL protocol overheads beyond "
    "alpha, contention on shared PCIe switches, the sampler / text encoders / VAE, memory limits.",
]


# ---- models -------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),   # diffusers' name for the number of heads (heads of 64)
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, conv_in_kernel=3, conv_out_kernel=3,
)
# stabilityai/stable-diffusion-2-1, unet/config.json (for AsyncDiff's SD 2.1 figures)
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
)
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_TEXT_TOKENS = 512       # T5 max_sequence_length of FLUX.1-dev


def unet_inputs(config: dict, batch: int, height: int, width: int, text_tokens: int = 77) -> dict:
    """Meta inputs of one UNet call: latent, timestep, text states (and SDXL's pooled text + size ids)."""
    with torch.device("meta"):
        inputs = dict(sample=torch.empty(batch, config["in_channels"], height, width),
                      timestep=torch.full((batch,), 500.0),
                      encoder_hidden_states=torch.empty(batch, text_tokens, config["cross_attention_dim"]))
        if config.get("addition_embed_type") == "text_time":
            inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, 1280),
                                           "time_ids": torch.empty(batch, 6)}
    return inputs


def flux_inputs(image_tokens: int, batch: int = 1) -> dict:
    """Meta inputs of one FLUX call: packed latent tokens, T5 states, pooled CLIP, ids, guidance."""
    with torch.device("meta"):
        return dict(hidden_states=torch.empty(batch, image_tokens, FLUX_DEV["in_channels"]),
                    encoder_hidden_states=torch.empty(batch, FLUX_TEXT_TOKENS, FLUX_DEV["joint_attention_dim"]),
                    pooled_projections=torch.empty(batch, FLUX_DEV["pooled_projection_dim"]),
                    timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(image_tokens, 3),
                    txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3), guidance=torch.full((batch,), 3.5))


def flux_image_tokens(pixels: int) -> int:
    latent = pixels // 8            # VAE downsampling
    return (latent // 2) ** 2       # 2x2 patches packed into tokens


# ---- counting one call on the meta device ------------------------------------------------------
@dataclass
class Attention:
    """One scaled_dot_product_attention call: q [B, H, Sq, D], k and v [B, H, Sk, D]."""

    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    dim: int

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.heads * self.q_tokens * self.kv_tokens * self.dim

    @property
    def is_self(self) -> bool:
        return self.q_tokens == self.kv_tokens


def _sdpa_qkv(query, key, value, *args, **kwargs):
    return query, key, value


class AttentionCounter(TorchFunctionMode):
    """Records every SDPA call's shapes and returns an empty output instead of running it (so the
    FlopCounterMode around it counts everything but attention)."""

    def __init__(self):
        super().__init__()
        self.calls: list[Attention] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = _sdpa_qkv(*args, **kwargs)
        if q.ndim != 4:
            raise ValueError(f"expected q of [B, H, S, D], got {tuple(q.shape)}")
        self.calls.append(Attention(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]))
        return q.new_empty(*q.shape[:-1], v.shape[-1])


class FlopCounter(TorchDispatchMode):
    """``FlopCounterMode``'s formulas (``flop_registry``: matmuls, convolutions) without its
    per-module bookkeeping, which makes it several times slower; totals are the same."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class Probe:
    """A module's share of one call: FLOPs (attention included), and what it returned."""

    order: int
    flops: int
    attention_flops: int
    out_elements: int
    out_shapes: list


@dataclass
class Count:
    dense_flops: int                        # matmuls and convolutions, attention excluded
    attentions: list[Attention]
    probes: dict[str, Probe]
    convs: list[tuple]                      # (B, C, H, W, kernel, stride, height padding) of padded convs
    norms: list[tuple]                      # (B, groups) of each GroupNorm
    out_elements: int
    seconds: float

    @property
    def attention_flops(self) -> int:
        return sum(a.flops for a in self.attentions)

    @property
    def flops(self) -> int:
        return self.dense_flops + self.attention_flops


def count(model: torch.nn.Module, inputs: dict, probes: list[str] = ()) -> Count:
    """One call of ``model`` on meta ``inputs``, counted; ``probes``: module names whose own
    FLOPs and outputs are recorded (nesting allowed)."""
    flops, attention = FlopCounter(), AttentionCounter()
    records: dict[str, Probe] = {}
    opened: dict[str, tuple] = {}
    convs, norms, handles = [], [], []
    modules = dict(model.named_modules())

    def pre(name):
        def hook(module, args, kwargs):
            opened[name] = (len(opened) + len(records), flops.get_total_flops(), len(attention.calls))
        return hook

    def post(name):
        def hook(module, args, kwargs, output):
            order, f0, a0 = opened.pop(name)
            attn = sum(a.flops for a in attention.calls[a0:])
            tensors = _tensors(output)
            records[name] = Probe(order, flops.get_total_flops() - f0 + attn, attn,
                                  sum(t.numel() for t in tensors), [list(t.shape) for t in tensors])
        return hook

    for name in probes:
        handles.append(modules[name].register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post(name), with_kwargs=True))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.padding[0] > 0:
            handles.append(module.register_forward_pre_hook(
                lambda m, args: convs.append((*args[0].shape, m.kernel_size[0], m.stride[0], m.padding[0]))))
        elif isinstance(module, torch.nn.GroupNorm):
            handles.append(module.register_forward_pre_hook(
                lambda m, args: norms.append((args[0].shape[0], m.num_groups))))
    start = time.perf_counter()
    try:
        with torch.no_grad(), flops, attention:
            out = model(**inputs, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return Count(flops.get_total_flops(), attention.calls, records, convs, norms,
                 _tensors(out)[0].numel(), time.perf_counter() - start)


def build(cls, config: dict):
    with torch.device("meta"):
        return cls(**config).eval()


# ---- what a strategy communicates ----------------------------------------------------------------
@dataclass
class Transfer:
    """``calls`` collectives per step, each of a local tensor of ``elements`` elements, over a
    group of ``group`` ranks (0: all the scheme's ranks)."""

    what: str
    kind: str                # all_gather | all_to_all | ring_shift | broadcast | send
    elements: int
    calls: int = 1
    hidden: bool = False     # asynchronous, overlapped with compute
    senders: float = 1.0     # for "send": the fraction of ranks that send it
    itemsize: int = BYTES
    group: int = 0

    def sent(self, n: int) -> float:
        """Bytes one rank sends per step (sdinfer's Communicator accounting, averaged over the ranks)."""
        n = self.group or n
        e = self.elements * self.itemsize * self.calls
        return {"all_gather": e * (n - 1), "all_to_all": e * (n - 1) / n, "ring_shift": e,
                "broadcast": e * (n - 1) / n, "send": e * self.senders}[self.kind]

    def seconds(self, n: int, link: Link) -> float:
        """alpha per collective + the bytes the busiest rank's link carries."""
        n = self.group or n
        e = self.elements * self.itemsize
        wire = {"all_gather": e * (n - 1), "all_to_all": e * (n - 1) / n, "ring_shift": e,
                "broadcast": e, "send": e}[self.kind]
        return self.calls * (link.alpha + wire / link.bandwidth)


@dataclass
class Scheme:
    """A strategy at N devices: per-device compute and communication of one steady-state step."""

    model: str
    strategy: str
    n: int
    exact: bool
    flops: float                         # per device per step
    transfers: list[Transfer]
    timing: str = "sync"                 # sync | overlap | ring
    warmup_steps: int = 0
    warmup: str = ""                     # "" | "sync": per-device compute + every transfer waited for |
    #                                      "whole": t(1) (each rank runs the whole model) | "whole+comm"
    fill_flops: float = 0.0              # a pipeline's fill, once per generation
    ring_layers: list[tuple] = field(default_factory=list)   # (own-block FLOPs, remote-block FLOPs, shift)
    rounds_per_step: float = 1.0         # < 1: several steps per round (AsyncDiff stride 2)
    devices: int = 0                     # devices used, where not n (AsyncDiff stride 2: n + 1)
    slots: float = 1.0                   # compute time x this: a pipeline that drains every step
    note: str = ""

    @property
    def world(self) -> int:
        return self.devices or self.n

    def bytes_sent(self) -> float:
        return sum(t.sent(self.n) for t in self.transfers)


@dataclass
class Timing:
    gpu: str
    link: str
    compute_ms: float
    comm_ms: float
    hidden_comm_ms: float
    step_ms: float
    total_s: float
    single_s: float
    speedup: float


def predict(s: Scheme, single_flops: float, steps: int, gpu: GPU, link: Link) -> Timing:
    rate = gpu.peak * MFU
    t1 = single_flops / rate
    tc = s.flops / rate * s.slots       # a draining pipeline idles (slots - 1) / slots of the step
    hidden = sum(t.seconds(s.n, link) for t in s.transfers if t.hidden)
    waited = sum(t.seconds(s.n, link) for t in s.transfers if not t.hidden)
    if s.timing == "ring":
        attention = sum(own + (s.n - 1) * remote for own, remote, _ in s.ring_layers)
        step = (s.flops - attention) / rate + waited + sum(
            own / rate + (s.n - 1) * max(remote / rate, shift.seconds(s.n, link) / shift.calls)
            for own, remote, shift in s.ring_layers)
    elif s.timing == "overlap":
        step = max(tc, hidden) + waited
    else:
        step = tc + hidden + waited
    warm = {"": step, "sync": tc + hidden + waited, "whole": t1, "whole+comm": t1 + hidden + waited}[s.warmup]
    w = min(s.warmup_steps, steps)
    total = w * warm + math.ceil((steps - w) * s.rounds_per_step) * step + s.fill_flops / rate
    return Timing(gpu.name, link.name, s.flops / rate * 1e3, (hidden + waited) * 1e3, hidden * 1e3, step * 1e3, total,
                  steps * t1, steps * t1 / total)


# ---- strategies -----------------------------------------------------------------------------------
def _grouped(transfers: list[Transfer]) -> list[Transfer]:
    """Same-shaped transfers merged into one entry with a call count."""
    merged: dict[tuple, Transfer] = {}
    for t in transfers:
        key = (t.what, t.kind, t.elements, t.hidden, t.senders, t.itemsize, t.group)
        if key in merged:
            merged[key].calls += t.calls
        else:
            merged[key] = Transfer(**asdict(t))
    return list(merged.values())


def _shares(loads: list[float], total: float) -> str:
    return ", ".join(f"{x / total:.0%}" for x in loads)


@dataclass
class Sharded:
    """One call counted on its whole input and on half its rows (latent rows, or image tokens), the
    batch the same.  Its dense FLOPs are affine in the rows (convolutions and projections scale with
    them; the timestep and text embeddings, the text-side projections and the replicated text
    tokens do not) and linear in the batch, so the two counts give a patch / shard of any size
    exactly (checked against direct counts of every share when this script was written)."""

    full: Count
    half: Count

    def dense(self, n: int, batch_share: float = 1.0) -> float:
        per_rows = 2 * (self.full.dense_flops - self.half.dense_flops)
        return batch_share * (per_rows / n + self.full.dense_flops - per_rows)

    def out_elements(self, n: int, batch_share: float = 1.0) -> int:
        return int(self.full.out_elements * batch_share / n)


def cfg_parallel(model: str, sh: Sharded) -> Scheme:
    """cfg_parallel.py: each rank one branch (batch halved); the outputs all-gathered (waited for)."""
    out = sh.out_elements(1, 0.5)
    return Scheme(model, "cfg", 2, True, sh.full.flops / 2,
                  [Transfer(f"model output of one branch, {out} el.", "all_gather", out)])


def distrifusion_transfers(full: Count, n: int, batch: int, group: int = 0) -> list[Transfer]:
    """distrifusion.py (Li et al., CVPR 2024, Sec. 4): per self-attention layer the patch's K and V
    all-gathered; per Conv2d padded by p > 0 rows along the height the p rows at the top and bottom
    of its input patch (the halos) all-gathered; per GroupNorm the patch's per-group mean and
    variance all-gathered (float32); after warm-up all asynchronous (used at the next step)."""
    scale = batch / full.attentions[0].batch
    out = []
    for a in full.attentions:
        if a.is_self:
            b = int(a.batch * scale)
            out.append(Transfer(f"self-attn K/V of the patch, 2 x {b} x {a.q_tokens // n} tokens x "
                                f"{a.heads * a.dim}", "all_gather", 2 * b * (a.q_tokens // n) * a.heads * a.dim,
                                hidden=True, group=group))
    for b, c, h, w, k, stride, p in full.convs:
        b = int(b * scale)
        out.append(Transfer(f"conv halo, 2 x {p} rows x {b} x {c} ch x {w}", "all_gather",
                            2 * p * b * c * w, hidden=True, group=group))
    for b, groups in full.norms:
        b = int(b * scale)
        out.append(Transfer(f"GroupNorm statistics, 2 x {b} x {groups} groups", "all_gather", 2 * b * groups,
                            hidden=True, itemsize=STATS_BYTES, group=group))
    return _grouped(out)


def distrifusion(model: str, sh: Sharded, n: int) -> Scheme:
    """Each device runs its patch (rows H/N) of the full batch: convolutions and projections on the
    patch, attention of the patch's queries over every token's K/V (fresh own, stale others)."""
    full = sh.full
    flops = sh.dense(n) + full.attention_flops / n
    out = sh.out_elements(n)
    transfers = distrifusion_transfers(full, n, full.attentions[0].batch) + [
        Transfer(f"model output of the patch, {out} el.", "all_gather", out)]
    return Scheme(model, "distrifusion", n, False, flops, transfers, "overlap", WARMUP["distrifusion"], "sync")


def cfg_distrifusion(model: str, sh: Sharded, n: int) -> Scheme:
    """DistriFusion's split_batch: the two guidance branches on two groups of N/2 devices, each group
    DistriFusion over its N/2 devices on a batch of 1; the output all-gathered over all N."""
    m = n // 2
    if m == 1:
        s = cfg_parallel(model, sh)
        return Scheme(model, "cfg x distrifusion", n, True, s.flops, s.transfers, note="= cfg at N = 2")
    full = sh.full
    flops = sh.dense(m, 0.5) + full.attention_flops / 2 / m
    out = sh.out_elements(m, 0.5)
    transfers = distrifusion_transfers(full, m, 1, group=m) + [
        Transfer(f"model output of the patch, {out} el. (over all {n} ranks)", "all_gather", out)]
    return Scheme(model, "cfg x distrifusion", n, False, flops, transfers, "overlap",
                  WARMUP["distrifusion"], "sync", note=f"two groups of {m}")


def _image_tokens(a: Attention, text: int) -> int:
    return a.q_tokens - text


def ulysses(model: str, sh: Sharded, n: int, text: int, out_channels: int) -> Scheme:
    """sequence_parallel.py, Ulysses: per attention layer q, k, v of the image tokens (one
    all-to-all) and the output (a second), the text rows of the output all-gathered over the heads;
    the final projection's output all-gathered once.  Per device: the image shard's projections
    and MLPs, the replicated text tokens', and H/N heads of attention over every token."""
    full, transfers = sh.full, []
    for a in full.attentions:
        s = _image_tokens(a, text) // n
        transfers += [
            Transfer(f"q, k, v of the image shard, 3 x {a.batch} x {a.heads} x {s} x {a.dim}", "all_to_all",
                     3 * a.batch * a.heads * s * a.dim),
            Transfer(f"attention output, {a.batch} x {a.heads // n} x {s * n} x {a.dim} back to shards",
                     "all_to_all", a.batch * a.heads * s * a.dim),
            Transfer(f"text rows of the output, {a.batch} x {a.heads // n} x {text} x {a.dim}", "all_gather",
                     a.batch * (a.heads // n) * text * a.dim)]
    a = full.attentions[0]
    s = _image_tokens(a, text) // n
    transfers.append(Transfer(f"final projection of the shard, {a.batch} x {s} x {out_channels}", "all_gather",
                              a.batch * s * out_channels))
    return Scheme(model, "ulysses", n, True, sh.dense(n) + full.attention_flops / n, _grouped(transfers))


def ring(model: str, sh: Sharded, n: int, text: int, out_channels: int) -> Scheme:
    """sequence_parallel.py, ring: per attention layer the image K/V blocks shifted N - 1 times,
    each shift overlapped with attention on the block at hand; every rank keeps all text queries
    and text K/V (replicated), so its attention is (S/N + T) queries over S + T keys."""
    full, layers, transfers, attention = sh.full, [], [], 0
    for a in full.attentions:
        s = _image_tokens(a, text) // n
        own = 4 * a.batch * a.heads * (s + text) * (s + text) * a.dim
        remote = 4 * a.batch * a.heads * (s + text) * s * a.dim
        shift = Transfer(f"image K/V block, 2 x {a.batch} x {a.heads} x {s} x {a.dim}", "ring_shift",
                         2 * a.batch * a.heads * s * a.dim, calls=n - 1, hidden=True)
        layers.append((own, remote, shift))
        transfers.append(shift)
        attention += own + (n - 1) * remote
    a = full.attentions[0]
    s = _image_tokens(a, text) // n
    transfers.append(Transfer(f"final projection of the shard, {a.batch} x {s} x {out_channels}", "all_gather",
                              a.batch * s * out_channels))
    return Scheme(model, "ring", n, True, sh.dense(n) + attention, _grouped(transfers), "ring",
                  ring_layers=layers)


def _loads(costs: list[int], owners: list[int]) -> list[int]:
    loads = Counter()
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return [loads[k] for k in range(max(owners) + 1)]


def asyncdiff_blocks(model: str, full: Count, blocks: list[str], gives_skips: list[bool], n: int) -> Scheme | None:
    """asyncdiff.py: the adapter's blocks cut into N runs of about equal FLOPs; every block output
    another rank reads broadcast by its owner (asynchronous, waited for at the next call); the
    model output broadcast by the last component's owner (waited for at once).  What lies outside
    the blocks (embeddings, conv_in / conv_out, final norm) runs on every rank."""
    if len(blocks) < n:
        return None
    costs = [full.probes[b].flops for b in blocks]
    plan = make_plan(costs, gives_skips, n)
    transfers = [Transfer(f"output of {blocks[b]}, {full.probes[blocks[b]].out_shapes}", "broadcast",
                          full.probes[blocks[b]].out_elements, hidden=True) for b in sorted(plan.exchanged)]
    transfers.append(Transfer(f"model output, {full.out_elements} el.", "broadcast", full.out_elements))
    loads = _loads(costs, plan.owners)
    return Scheme(model, "asyncdiff", n, False, max(loads) + full.flops - sum(costs), _grouped(transfers),
                  "overlap", WARMUP["asyncdiff"], "whole",
                  note=f"sdinfer's split by blocks; component shares of the call's FLOPs: {_shares(loads, full.flops)}")


def asyncdiff_layers(model: str, full: Count, units: list[str], skips: list[tuple[str, str]], n: int,
                     stride: int = 1, warmup: int | None = None) -> Scheme:
    """AsyncDiff at the paper's granularity (split points between a UNet's resnets and attentions,
    as AsyncDiff's pipe_config.py cuts them): the layers cut into N runs of about equal FLOPs;
    exchanged: each cut's activation and every skip feature read on another rank.  ``stride`` 2
    (AsyncDiff's stride denoising, on N + 1 devices; sdinfer's ``asyncdiff:stride=2`` at block
    granularity): one round of the components advances two steps."""
    costs = [full.probes[u].flops for u in units]
    owners = balanced_split(costs, n)
    where = dict(zip(units, owners))
    transfers = [Transfer(f"activation at the cut after {units[i]}, {full.probes[units[i]].out_shapes}",
                          "broadcast", full.probes[units[i]].out_elements, hidden=True)
                 for i in range(len(units) - 1) if owners[i] != owners[i + 1]]
    transfers += [Transfer(f"skip {p} -> {c}, {full.probes[p].out_shapes}", "broadcast",
                           full.probes[p].out_elements, hidden=True) for p, c in skips if where[p] != where[c]]
    transfers.append(Transfer(f"model output, {full.out_elements} el.", "broadcast", full.out_elements))
    loads = _loads(costs, owners)
    name = "asyncdiff (layer split)" if stride == 1 else f"asyncdiff stride {stride} (layer split)"
    return Scheme(model, name, n, False, max(loads) + full.flops - sum(costs), _grouped(transfers), "overlap",
                  WARMUP["asyncdiff"] if warmup is None else warmup, "whole",
                  rounds_per_step=1 / stride, devices=n + stride - 1,
                  note=f"component shares of the call's FLOPs: {_shares(loads, full.flops)}")


def pipefusion(model: str, full: Count, blocks: list[str], n: int, patches: int = 0, drains: bool = True) -> Scheme:
    """pipefusion.py (Fang et al., 2024): the blocks in N contiguous stages of about equal block
    count (``stage_blocks``), the image tokens in M patches (default N) pipelined through them; a
    patch's queries attend over every patch's K/V (the later patches' one step stale, kept per layer
    on the stage: not communicated); per stage boundary each patch's activations sent to the next
    rank, the text stream with the first patch; the last rank broadcasts each patch's output.
    sdinfer's pipeline drains at the end of every step (the whole output on every rank before the
    sampler), so a step takes M + N - 1 patch slots of the slowest stage; the paper's flows on into
    the next step (``drains=False``: the fill is paid once).  Warm-up: the whole model, stage after
    stage, as one patch."""
    m = patches or n
    costs = [full.probes[b].flops for b in blocks]
    owners = [r for r in range(n) for _ in stage_blocks(len(blocks), n, r)]
    loads = _loads(costs, owners)
    stage = max(loads) + full.flops - sum(costs)     # every rank also runs the prelude and final norm
    act = full.probes[blocks[0]].out_elements         # a joint block's output: text + image tokens x C
    transfers = [
        Transfer(f"stage-boundary activations {full.probes[blocks[0]].out_shapes}, in {m} patches "
                 "(text with the first)", "send", act // m, calls=m, hidden=True, senders=(n - 1) / n),
        Transfer(f"model output, {full.out_elements} el., broadcast in {m} patches by the last rank", "broadcast",
                 full.out_elements // m, calls=m, hidden=True)]
    name = "pipefusion" if drains else "pipefusion (paper: no drain)"
    return Scheme(model, name, n, False, stage, transfers, "overlap", WARMUP["pipefusion"], "whole+comm",
                  fill_flops=0.0 if drains else (n - 1) * stage / m,
                  slots=(m + n - 1) / m if drains else 1.0,
                  note=f"stage shares of the call's FLOPs: {_shares(loads, full.flops)}; M = {m} patches"
                       + ("; drains every step" if drains else "; fill paid once"))


# ---- model layouts --------------------------------------------------------------------------------
def unet_layout(model: UNet2DConditionModel) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(blocks as sdinfer's UNet adapter lists them, layers in forward order, skip connections as
    (producer, consumer): diffusers' down_block_res_samples stack, popped by the up resnets)."""
    blocks = [f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"] + \
             [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    units, producers = ["conv_in"], ["conv_in"]
    for b, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            units.append(f"down_blocks.{b}.resnets.{i}")
            if i < len(attentions):
                units.append(f"down_blocks.{b}.attentions.{i}")
            producers.append(units[-1])
        if block.downsamplers is not None:
            units.append(f"down_blocks.{b}.downsamplers.0")
            producers.append(units[-1])
    units.append("mid_block.resnets.0")
    for i in range(len(model.mid_block.attentions)):
        units += [f"mid_block.attentions.{i}", f"mid_block.resnets.{i + 1}"]
    consumers = []
    for b, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(block.resnets)):
            units.append(f"up_blocks.{b}.resnets.{i}")
            consumers.append(units[-1])
            if i < len(attentions):
                units.append(f"up_blocks.{b}.attentions.{i}")
        if block.upsamplers is not None:
            units.append(f"up_blocks.{b}.upsamplers.0")
    units.append("conv_out")
    if len(consumers) != len(producers):
        raise ValueError(f"{len(producers)} skip features for {len(consumers)} up resnets")
    return blocks, units, list(zip(reversed(producers), consumers))


def flux_blocks(model: FluxTransformer2DModel) -> list[str]:
    return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + \
           [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]


# ---- the runs -------------------------------------------------------------------------------------
def count_unet(model, config: dict, latent: int, probes: list[str] = ()) -> Sharded:
    """The guided call (batch 2) on the whole latent (with ``probes``) and on half its rows."""
    return Sharded(count(model, unet_inputs(config, 2, latent, latent), probes),
                   count(model, unet_inputs(config, 2, latent // 2, latent)))


def sdxl_schemes(c: Sharded, blocks, units, skips, model: str = "sdxl", ns=WORLD) -> list[Scheme]:
    gives_skips = [b.startswith("down_blocks") for b in blocks]
    out = [cfg_parallel(model, c)] if 2 in ns else []
    for n in ns:
        out.append(distrifusion(model, c, n))
        out.append(cfg_distrifusion(model, c, n))
        s = asyncdiff_blocks(model, c.full, blocks, gives_skips, n)
        if s is not None:
            out.append(s)
        out.append(asyncdiff_layers(model, c.full, units, skips, n))
    return out


def flux_schemes(sh: Sharded, blocks: list[str], text: int, ns=WORLD) -> list[Scheme]:
    full, out_channels = sh.full, FLUX_DEV["in_channels"]
    out = []
    for n in ns:
        out += [ulysses("flux", sh, n, text, out_channels),
                ring("flux", sh, n, text, out_channels),
                pipefusion("flux", full, blocks, n),
                pipefusion("flux", full, blocks, n, drains=False),
                asyncdiff_blocks("flux", full, blocks, [False] * len(blocks), n)]
    return out


def rows(schemes: list[Scheme], single: Count, steps: int, gpu: GPU, link_list: list[Link]) -> list[dict]:
    out = []
    for s in schemes:
        timings = [predict(s, single.flops, steps, gpu, link) for link in link_list]
        out.append(dict(model=s.model, strategy=s.strategy, n=s.world, exact=s.exact,
                        tflop_per_device_step=s.flops / 1e12, mb_sent_per_device_step=s.bytes_sent() / 1e6,
                        warmup_steps=s.warmup_steps, steps=steps, note=s.note,
                        timings=[asdict(t) for t in timings],
                        transfers=[dict(asdict(t), mb_sent_per_step=t.sent(s.n) / 1e6) for t in s.transfers]))
    return out


# ---- output -------------------------------------------------------------------------------------------
def _fmt_comm(t: dict) -> str:
    if t["hidden_comm_ms"] and t["hidden_comm_ms"] < t["comm_ms"]:
        return f"{t['comm_ms']:.1f} ({t['hidden_comm_ms']:.1f} hidden)"
    if t["hidden_comm_ms"]:
        return f"{t['comm_ms']:.1f} (hidden)"
    return f"{t['comm_ms']:.1f}"


def table(results: list[dict]) -> list[str]:
    links_ = [t["link"] for t in results[0]["timings"]]
    head = ["strategy", "exact", "N", "TFLOP / device / step", "compute ms / step", "MB sent / device / step"]
    for link in links_:
        head += [f"{link}: comm ms / step", f"{link}: step ms", f"{link}: speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (r["strategy"], r["n"])):
        cells = [r["strategy"], "yes" if r["exact"] else "stale", str(r["n"]), f"{r['tflop_per_device_step']:.2f}",
                 f"{r['timings'][0]['compute_ms']:.1f}", f"{r['mb_sent_per_device_step']:.1f}"]
        for t in r["timings"]:
            cells += [_fmt_comm(t), f"{t['step_ms']:.1f}", f"**{t['speedup']:.2f}x**"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def transfer_lines(results: list[dict], n: int) -> list[str]:
    lines = []
    for r in results:
        if r["n"] != n:
            continue
        lines.append(f"- **{r['strategy']}** (N = {n}; {r['note'] or 'no note'}):")
        for t in r["transfers"]:
            lines.append(f"  - {t['what']}: {t['kind']}{' (async)' if t['hidden'] else ''}, "
                         f"{t['calls']} x {t['elements'] * t['itemsize'] / 1e6:.3g} MB local tensor, "
                         f"{t['mb_sent_per_step']:.2f} MB sent / device / step")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU of the main tables")
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel_scaling")
    args = parser.parse_args()
    start = time.perf_counter()
    gpu = GPUS[args.gpu]
    report: dict = dict(title="Prediction (not measured)", assumptions=ASSUMPTIONS, caveats=CAVEATS,
                        gpu=asdict(gpu),
                        links=[asdict(l) for l in links(gpu)], mfu=MFU, steps=STEPS, warmup=WARMUP)

    # SDXL, 1024 x 1024 (latent 128 x 128), guided batch of 2
    unet = build(UNet2DConditionModel, SDXL_UNET)
    blocks, units, skips = unet_layout(unet)
    sdxl = count_unet(unet, SDXL_UNET, 128, blocks + units)
    sdxl_results = rows(sdxl_schemes(sdxl, blocks, units, skips), sdxl.full, STEPS["sdxl"], gpu, links(gpu))

    # FLUX.1-dev, 1024 x 1024: 4096 image tokens, 512 text tokens, batch 1 (guidance-distilled)
    flux = build(FluxTransformer2DModel, FLUX_DEV)
    fblocks = flux_blocks(flux)
    tokens = flux_image_tokens(1024)
    fsh = Sharded(count(flux, flux_inputs(tokens), fblocks), count(flux, flux_inputs(tokens // 2)))
    flux_full = fsh.full
    flux_results = rows(flux_schemes(fsh, fblocks, FLUX_TEXT_TOKENS), flux_full, STEPS["flux"], gpu, links(gpu))

    # the papers' settings
    papers = paper_settings(unet, blocks, units, skips, sdxl.full, fsh, fblocks)
    del unet, flux

    counts = {
        "sdxl_1024": _count_summary(sdxl.full, "SDXL UNet, 1024 x 1024 (latent 128 x 128), batch 2 (CFG)"),
        "flux_1024": _count_summary(flux_full, f"FLUX.1-dev, 1024 x 1024 ({tokens} image + {FLUX_TEXT_TOKENS} "
                                                "text tokens), batch 1"),
        **papers.pop("counts"),
    }
    report.update(counts=counts, sdxl=sdxl_results, flux=flux_results, papers=papers,
                  seconds=time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report, gpu)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out.with_suffix('.md')} and .json in {report['seconds']:.1f} s")


def _count_summary(c: Count, what: str) -> dict:
    self_attn = Counter((a.batch, a.heads, a.q_tokens, a.dim) for a in c.attentions if a.is_self)
    cross = Counter((a.batch, a.heads, a.q_tokens, a.kv_tokens, a.dim) for a in c.attentions if not a.is_self)
    return dict(what=what, tflop=c.flops / 1e12, attention_tflop=c.attention_flops / 1e12,
                dense_tflop=c.dense_flops / 1e12, counted_in_s=c.seconds,
                self_attention_layers={f"B{b} H{h} S{s} D{d}": k for (b, h, s, d), k in self_attn.items()},
                cross_attention_layers={f"B{b} H{h} Sq{s} Sk{t} D{d}": k for (b, h, s, t, d), k in cross.items()},
                convs_kxk=len(c.convs), groupnorms=len(c.norms), output_elements=c.out_elements)


# ---- the papers' settings ---------------------------------------------------------------------------
DISTRIFUSION_REPORTED = {"distrifusion": {2: 1.8, 4: 3.4, 8: 6.1}, "cfg x distrifusion": {4: 3.6, 8: 6.6}}
XDIT_FLUX_H100 = {   # xDiT docs/performance/flux.md: FLUX.1-dev, 1024px, 28 steps, seconds on 4xH100
    "1 GPU": (6.71, 4.30), "ulysses 2": (4.38, 2.68), "ring 2": (5.31, 2.60), "ulysses 4": (4.24, 1.63),
    "ring 4": (5.11, 1.98)}   # (PyTorch, torch.compile)


def paper_settings(unet, blocks, units, skips, sdxl_full: Count, fsh: Sharded, fblocks) -> dict:
    a100, h100 = GPUS["A100"], GPUS["H100"]
    a100_nvlink, h100_nvlink = links(a100)[0], links(h100)[0]
    a100_pcie = PCIE
    out: dict = {"counts": {}, "rows": []}

    def add(paper, setting, scheme, single, steps, gpu, link, reported, reported_note=""):
        t = predict(scheme, single.flops, steps, gpu, link)
        out["rows"].append(dict(paper=paper, setting=setting, strategy=scheme.strategy, n=scheme.world,
                                reported=reported, reported_note=reported_note, predicted=t.speedup,
                                predicted_total_s=t.total_s, predicted_single_s=t.single_s, gpu=gpu.name,
                                link=link.name, warmup_steps=scheme.warmup_steps, note=scheme.note))

    # DistriFusion (Li et al., CVPR 2024): SDXL 3840 x 3840 (latent 480), 50-step DDIM, A100s over NVLink
    big = count_unet(unet, SDXL_UNET, 480)
    flux_full = fsh.full
    out["counts"]["sdxl_3840"] = _count_summary(big.full, "SDXL UNet, 3840 x 3840 (latent 480 x 480), batch 2")
    setting = "SDXL 3840x3840, 50-step DDIM, A100 NVLink"
    for n in WORLD:
        add("DistriFusion", setting, distrifusion("sdxl", big, n), big.full, 50, a100,
            a100_nvlink, DISTRIFUSION_REPORTED["distrifusion"][n], "U-Net latency speed-up (paper)")
    for n in (4, 8):
        add("DistriFusion", setting + ", with batch splitting",
            cfg_distrifusion("sdxl", big, n), big.full, 50, a100, a100_nvlink,
            DISTRIFUSION_REPORTED["cfg x distrifusion"][n], "with batch splitting for CFG (paper)")

    # xDiT: FLUX.1-dev 1024px, 28 steps, H100s over NVLink
    base_eager, base_compiled = XDIT_FLUX_H100["1 GPU"]
    for name, fn in (("ulysses", ulysses), ("ring", ring)):
        for n in (2, 4):
            eager, compiled = XDIT_FLUX_H100[f"{name} {n}"]
            scheme = fn("flux", fsh, n, FLUX_TEXT_TOKENS, FLUX_DEV["in_channels"])
            add("xDiT (FLUX.1-dev docs)", "FLUX.1-dev 1024px, 28 steps, H100 NVLink", scheme, flux_full, 28, h100,
                h100_nvlink, round(base_compiled / compiled, 2),
                f"torch.compile {base_compiled} s -> {compiled} s; PyTorch {base_eager} s -> {eager} s "
                f"({base_eager / eager:.2f}x)")
    t1 = 28 * flux_full.flops / (h100.peak * MFU)
    out["flux_single_h100"] = dict(
        predicted_s=t1, reported_pytorch_s=base_eager, reported_compiled_s=base_compiled,
        implied_mfu_pytorch=flux_full.flops * 28 / base_eager / h100.peak,
        implied_mfu_compiled=flux_full.flops * 28 / base_compiled / h100.peak)

    # AsyncDiff (Chen et al., NeurIPS 2024).  SDXL: README "2.8x faster on SDXL with 4 devices"
    # (13.81 s -> 4.98 s), run_sdxl.py defaults model_n 3, stride 2, warm_up 9 (devices = model_n + stride - 1)
    setting = "SDXL 1024, 50 steps, 4 devices (GPU not stated; A100 + PCIe 4.0 here)"
    add("AsyncDiff (README)", setting, asyncdiff_layers("sdxl", sdxl_full, units, skips, 3, stride=2, warmup=9),
        sdxl_full, 50, a100, a100_pcie, 2.8, "model_n 3, stride 2, warm_up 9 (run_sdxl.py defaults)")
    s = asyncdiff_layers("sdxl", sdxl_full, units, skips, 4, warmup=9)
    add("AsyncDiff (README)", setting, s, sdxl_full, 50, a100, a100_pcie, 2.8, "stride 1 at N = 4 for contrast")
    s = asyncdiff_blocks("sdxl", sdxl_full, blocks, [b.startswith("down_blocks") for b in blocks], 4)
    add("AsyncDiff (README)", setting + ", sdinfer's block split", s, sdxl_full, 50, a100, a100_pcie, 2.8,
        "sdinfer's asyncdiff (stride 1, warm-up 1) for contrast")

    # SD 2.1 (768 x 768, latent 96, CFG batch 2) on four A5000s: "2.7x with negligible degradation and
    # 4.0x with a 0.38 lower CLIP score" (abstract; which (model_n, stride) gives which is not stated there)
    sd21 = build(UNet2DConditionModel, SD21_UNET)
    b21, u21, s21 = unet_layout(sd21)
    sd21_full = count(sd21, unet_inputs(SD21_UNET, 2, 96, 96, text_tokens=77), b21 + u21)
    out["counts"]["sd21_768"] = _count_summary(sd21_full, "SD 2.1 UNet, 768 x 768 (latent 96 x 96), batch 2")
    setting = "SD 2.1 768px, 50 steps, 4 devices (A5000s, PCIe; A100 compute here, ratio only)"
    for n, stride in ((4, 1), (3, 2)):
        for warm in (1, 9):
            add("AsyncDiff (abstract)", setting, asyncdiff_layers("sd21", sd21_full, u21, s21, n, stride, warm),
                sd21_full, 50, a100, a100_pcie, "2.7 / 4.0",
                f"model_n {n}, stride {stride}, warm-up {warm}: the abstract's 2.7x (no quality loss) and 4.0x "
                "(CLIP -0.38) on 4 A5000s; which setting gave which is not in the abstract")
    return out


def markdown(report: dict, gpu: GPU) -> str:
    c = report["counts"]
    lines = [
        "# Prediction (not measured): multi-device scaling of sdinfer's parallel strategies",
        "",
        "Written by `bench/parallel_scaling.py` (run time "
        f"{report['seconds']:.0f} s on a CPU, models on the meta device).  **Nothing here was timed on a GPU**: "
        "compute is counted FLOPs at an assumed utilisation, communication is the bytes of each strategy's "
        "formula (the docstrings of `src/sdinfer/parallel/*.py`) over an assumed link.  The papers' reported "
        "figures are listed next to the predictions at their own settings, not mixed into them.",
        "",
        "## Assumptions",
        "",
        *[f"- {a}" for a in report["assumptions"]],
        "",
        "## Counted compute of one denoiser call",
        "",
        "| call | TFLOP | of which attention | self-attention layers | cross-attention layers |",
        "|---|---|---|---|---|",
    ]
    for v in c.values():
        lines.append(f"| {v['what']} | {v['tflop']:.2f} | {v['attention_tflop']:.2f} | "
                     f"{'; '.join(f'{k}: {n}' for k, n in v['self_attention_layers'].items())} | "
                     f"{'; '.join(f'{k}: {n}' for k, n in v['cross_attention_layers'].items()) or '-'} |")
    single = lambda key: c[key]["tflop"] * 1e12 / (gpu.peak * MFU)   # seconds per step
    lines += [
        "",
        f"One device ({gpu.name}, MFU {MFU}): SDXL 1024 {single('sdxl_1024') * 1e3:.0f} ms per step "
        f"({single('sdxl_1024') * STEPS['sdxl']:.1f} s for {STEPS['sdxl']} steps); FLUX.1-dev 1024 "
        f"{single('flux_1024') * 1e3:.0f} ms per step ({single('flux_1024') * STEPS['flux']:.1f} s for "
        f"{STEPS['flux']} steps).",
        "",
        f"## SDXL, 1024 x 1024, guided batch of 2, {STEPS['sdxl']} steps, {gpu.name}: prediction (not measured)",
        "",
        "Speed-up of the denoiser over the whole generation against one device; `stale` marks strategies "
        "that reuse the previous step's activations (their quality is a separate question, see BENCHMARKS.md). "
        "`asyncdiff` is sdinfer's split by the adapter's 7 UNet blocks (so at most 7 ranks); "
        "`asyncdiff (layer split)` cuts between resnets and attentions, as the AsyncDiff paper does.",
        "",
        *table(report["sdxl"]),
        "",
        f"## FLUX.1-dev, 1024 x 1024, batch 1, {STEPS['flux']} steps, {gpu.name}: prediction (not measured)",
        "",
        *table(report["flux"]),
        "",
        "sdinfer's sequence parallelism keeps the text tokens replicated: every rank runs the text stream "
        f"({FLUX_TEXT_TOKENS} of {FLUX_TEXT_TOKENS + flux_image_tokens(1024)} tokens) whole, so Ulysses' "
        "per-device FLOPs are " + ", ".join(
            f"{r['tflop_per_device_step']:.1f} TFLOP at N = {r['n']} (an even split: "
            f"{c['flux_1024']['tflop'] / r['n']:.1f})" for r in report["flux"] if r["strategy"] == "ulysses") + ".",
        "",
        "## At the papers' settings, next to their reported figures",
        "",
        "| paper | setting | strategy | devices | warm-up steps | reported speed-up | predicted (not measured) "
        "| link | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["papers"]["rows"]:
        lines.append(f"| {r['paper']} | {r['setting']} | {r['strategy']} | {r['n']} | {r['warmup_steps']} | "
                     f"{r['reported']}x | "
                     f"**{r['predicted']:.2f}x** | {r['gpu']} {r['link']} | "
                     f"{'; '.join(x for x in (r['reported_note'], r['note']) if x)} |")
    f = report["papers"]["flux_single_h100"]
    lines += [
        "",
        f"FLUX.1-dev on one H100, 28 steps: predicted {f['predicted_s']:.1f} s at MFU {MFU}; xDiT reports "
        f"{f['reported_pytorch_s']} s (PyTorch) and {f['reported_compiled_s']} s (torch.compile), i.e. an "
        f"implied MFU of {f['implied_mfu_pytorch']:.2f} and {f['implied_mfu_compiled']:.2f} on the counted FLOPs "
        "(if their figures are end-to-end, the denoiser's share is higher still).",
        "",
        "## Caveats",
        "",
        *[f"- {x}" for x in report["caveats"]],
        "",
        "## What each strategy communicates (N = 4)",
        "",
        "Per step; `local tensor` is what one rank contributes to one collective, `sent` is the rank-averaged "
        "count of sdinfer's `Communicator`.",
        "",
        *transfer_lines(report["sdxl"], 4),
        *transfer_lines(report["flux"], 4),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
