"""DiTFastAttn (Yuan, Zhang, Ning et al., "DiTFastAttn: Attention Compression for Diffusion
Transformer Models", NeurIPS 2024).

Attention in a diffusion transformer is redundant in three ways, each with a cheaper stand-in
for full attention O = softmax(Q K^T / sqrt(d)) V of one self-attention layer at one step:

- spatial (Sec. 3.2, "Window Attention with Residual Sharing"): most of a query's weight lies on
  nearby tokens, and the part that does not, the residual R = O_full - O_window, changes slowly
  over the steps.  On a full step that a later window step needs, the window attention is also
  computed and R kept; a window step computes only the window attention and adds R:
  O_t = W(x_t) + R_s (Eq. 4, s the last full step of the layer);
- temporal (Sec. 3.3, "Attention Sharing across Timesteps"): a layer's attention output at
  step t is close to the one at step t - 1, so it is reused: O_t = O_{t-1} (costs nothing);
- conditional (Sec. 3.4, "Attention Sharing across CFG"): in a batched classifier-free
  guidance call the unconditional half's attention is close to the conditional half's, so
  attention runs on the conditional half only and its output is given to both halves (half the
  cost; combines with full or window attention).

Which stand-in each layer takes at each step is a plan chosen greedily on calibration prompts
(Sec. 3.5, Alg. 1): at each step after the first (which computes everything), layer by layer in
the model's order, the candidates are tried cheapest first (output sharing, window + CFG sharing,
window, full + CFG sharing) and the first whose *model output* stays within the layer's share of
the threshold delta of the output with full attention in every layer is kept (the layers before
keep their choices; none: full attention).  The error is the relative L1 error sum|o' - o| /
sum|o| of the denoiser's output at that call; the layer's share is delta (l + 1) / L for layer l
of L, as the reference code scales it, since the error the earlier layers chose stays in the
output.  The step then runs with its chosen row, so later steps are decided on the compressed
trajectory.  Threshold 0 keeps full attention everywhere (the output equals the unmodified
model's).  Each candidate costs one model call: a calibration generation costs about
(1 + 4 L) times an uncompressed one.  (The reference measures a clipped element-wise relative
error; the relative L1 error is what sdinfer's other caches decide by.)

Here: the window is the 1-D token order (query i attends the keys j with |i - j| <= window_size
// 2, flash-attn's ``window_size=(w // 2, w // 2)``, as the reference code).  In a joint attention
(SD3, FLUX double blocks) the text tokens, appended to the image tokens inside the attention, are
kept global (they attend and are attended by every token): the window is meant for the image's
neighbourhoods, and cutting a text token off from most of the image would drop the prompt.  The
window replaces PyTorch's ``scaled_dot_product_attention`` call (intercepted by a torch function
mode, so diffusers' processors still do the projections): image queries in blocks of window_size
// 2 attend the keys within reach of their block (and the text keys) under the band's mask, text
queries attend all keys (``banded_attention``; about 3 / 2 of the window's pairs, where a banded
kernel such as flash-attn's ``window_size`` computes the window's pairs alone, which is what
``attention_flops`` counts).  A sequence shorter than three blocks, or a call with its own mask,
runs as one masked call.  The residual is kept at the attention module's output, after the
output projection: every processor maps the attention result affinely there, so
O_full' - O_window' is the projected residual and adding it back is Eq. 4.

Plans are chosen per (step count, window size, threshold) and are specific to the model and its
layers; a run follows the plan of its own step count.  ``sdinfer calibrate ditfastattn`` writes
them beside the model (``MODEL/sdinfer_calibration/ditfastattn.safetensors``: one int8 (steps,
layers) table of method codes per plan, the errors behind each choice, and JSON metadata).  Layers: every
self-attention (and joint-attention) module in the adapter's blocks; cross-attention is left alone.

Cached: per layer its last output (output sharing) and the residual of its last full step that a
window step needs.  CFG sharing applies where a call batches both guidance branches and the step
context says which half is which (sdinfer's loop; stock pipelines that report it); elsewhere a
CFG-shared entry runs its method on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from ..context import StepContext, current_step
from ..errors import UserError
from ..models import artifacts
from ..models.adapters import adapter_for, supported
from .base import (BranchStates, CacheConfig, CacheHandle, hidden_states_of, hook_name, map_tensors, require_step,
                   tensors_of)
from .calibration import Calibration

METHOD = "ditfastattn"
CALIBRATE = "sdinfer calibrate ditfastattn --model MODEL"

# method codes, as stored in a plan
FULL, FULL_CFG, WINDOW, WINDOW_CFG, SHARE = 0, 1, 2, 3, 4
NAMES = {FULL: "full_attn", FULL_CFG: "full_attn+cfg_share", WINDOW: "residual_window_attn",
         WINDOW_CFG: "residual_window_attn+cfg_share", SHARE: "output_share"}
CANDIDATES = (SHARE, WINDOW_CFG, WINDOW, FULL_CFG)   # cheapest first; FULL is the fallback
WINDOWED = (WINDOW, WINDOW_CFG)
CFG_SHARED = (FULL_CFG, WINDOW_CFG)


def check_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value < 1:
        raise UserError(f"{METHOD} threshold must be a relative error in [0, 1), such as 0.05 (0: no "
                        f"compression), got {value!r}")
    return float(value)


def check_window(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or value < 1:
        raise UserError(f"{METHOD} window_size must be a whole number of tokens >= 1 (the paper: 128 for "
                        f"DiT-XL/2 at 256 px, 256 tokens), got {value!r}")
    return int(value)


@dataclass
class DiTFastAttnConfig(CacheConfig):
    # delta: the denoiser output's relative error the plan's choices may bring (BENCHMARKS.md, DDIM 20:
    # on the default DiT 0.025 kept adherence at 68% of the attention FLOPs; on dit-64 0.05 ran 1.47x
    # faster within half a point of adherence)
    threshold: float = 0.025
    window_size: int = 128     # keys within window_size // 2 tokens of the query (the paper's DiT-256 setting)
    calibration: str = ""      # a plan file; empty: the one beside the model's weights
    # under CFG parallel each rank's call holds one branch, so CFG-shared entries run on it whole (the
    # plan without its CFG sharing); the window intercepts the attention call sequence parallelism
    # (Ulysses, Ring) replaces, so those are refused
    exact_parallel = ("cfg",)

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)
        self.window_size = check_window(self.window_size)


# ---- the window ----------------------------------------------------------------------------
def window_mask(tokens: int, window_size: int, local: int, text_first: bool) -> torch.Tensor:
    """(tokens, tokens) booleans, True where query i attends key j: image (local) tokens within
    window_size // 2 of each other; the ``tokens - local`` text tokens of a joint attention (after
    the image tokens, or before them where ``text_first``) attend and are attended by all."""
    index = torch.arange(tokens)
    mask = (index[:, None] - index[None, :]).abs() <= window_size // 2
    is_text = index < tokens - local if text_first else index >= local
    return mask | is_text[:, None] | is_text[None, :]


def window_pairs(tokens: int, window_size: int, local: int) -> int:
    """The (query, key) pairs ``window_mask`` keeps, counted without building it: the band of the
    ``local`` image tokens, and every pair with a text token."""
    index, half = torch.arange(local), window_size // 2
    band = int((index.add(half).clamp(max=local - 1) - index.sub(half).clamp(min=0) + 1).sum())
    text = tokens - local
    return band + text * tokens + local * text


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def band_blocks(tokens: int, local: int, half: int, text_first: bool) -> list[tuple[slice, slice, torch.Tensor]]:
    """The blocks ``banded_attention`` computes: per block of ``half`` image queries (their slice of
    the sequence), the slice of image keys within reach and the (queries, reach + text) mask."""
    text, start, block = tokens - local, (tokens - local) if text_first else 0, max(half, 1)
    blocks = []
    for a in range(0, local, block):
        b = min(a + block, local)
        lo, hi = max(0, a - half), min(local, b + half)
        band = (torch.arange(a, b)[:, None] - torch.arange(lo, hi)[None, :]).abs() <= half
        blocks.append((slice(start + a, start + b), slice(start + lo, start + hi),
                       torch.cat([band, band.new_ones(b - a, text)], dim=1)))
    return blocks


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, local: int,
                     blocks: list[tuple[slice, slice, torch.Tensor]], text_first: bool) -> torch.Tensor:
    """The window attention computing about the band only: each block of image queries against the
    image keys within reach and the text keys, the text queries against every key.  Equal to the
    masked call (up to rounding); about (3 half + text) keys per image query instead of all."""
    tokens = q.shape[-2]
    text = slice(0, tokens - local) if text_first else slice(local, tokens)
    pieces = []
    for queries, reach, mask in blocks:
        keys = torch.cat([k[..., reach, :], k[..., text, :]], dim=-2)
        values = torch.cat([v[..., reach, :], v[..., text, :]], dim=-2)
        pieces.append(F.scaled_dot_product_attention(q[..., queries, :], keys, values,
                                                     attn_mask=mask.to(q.device), scale=scale))
    image = torch.cat(pieces, dim=-2)
    if tokens == local:
        return image
    text_out = F.scaled_dot_product_attention(q[..., text, :], k, v, scale=scale)
    return torch.cat([text_out, image] if text_first else [image, text_out], dim=-2)


class WindowedAttention(TorchFunctionMode):
    """Inside: every ``scaled_dot_product_attention`` call attends within the window only: by
    ``banded_attention`` where the band spans 3 blocks or more and the call is plain, else as the
    call itself under the window's mask."""

    def __init__(self, window: "Window", local: int):
        super().__init__()
        self.window, self.local, self.calls = window, local, 0
        self.geometry: tuple[int, int, int] | None = None   # tokens, heads x head width, attended pairs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, given, dropout, causal, scale, gqa = _sdpa_arguments(*args, **kwargs)
        if causal or q.shape[-2] != k.shape[-2]:
            raise UserError(f"{self.window.where}: {METHOD}'s window needs self- or joint attention (queries and "
                            f"keys of one sequence, not causal); this call has {q.shape[-2]} queries and "
                            f"{k.shape[-2]} keys")
        tokens, local = q.shape[-2], min(self.local, q.shape[-2])
        self.calls += 1
        self.geometry = (tokens, q.shape[1] * q.shape[-1] if q.ndim == 4 else q.shape[-1],
                         window_pairs(tokens, self.window.window_size, local))
        blocks = self.window.blocks(tokens, local)
        if given is None and not dropout and not gqa and len(blocks) >= 3:
            return banded_attention(q, k, v, scale, local, blocks, self.window.text_first)
        window = self.window.mask(tokens, local).to(q.device)   # (tokens, tokens): only where the band cannot run
        if given is None:
            mask = window
        elif given.dtype == torch.bool:
            mask = given & window
        else:
            mask = given.masked_fill(~window, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=gqa)


class Window:
    """The window attention of one layer: its module's forward with the windowed attention call."""

    def __init__(self, window_size: int, text_first: bool, where: str):
        self.window_size, self.text_first, self.where = window_size, text_first, where
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.bands: dict[tuple[int, int], list] = {}
        self.geometry: tuple[int, int, int] | None = None

    def mask(self, tokens: int, local: int) -> torch.Tensor:
        if (tokens, local) not in self.masks:
            self.masks[(tokens, local)] = window_mask(tokens, self.window_size, local, self.text_first)
        return self.masks[(tokens, local)]

    def blocks(self, tokens: int, local: int) -> list:
        if (tokens, local) not in self.bands:
            self.bands[(tokens, local)] = band_blocks(tokens, local, self.window_size // 2, self.text_first)
        return self.bands[(tokens, local)]

    def __call__(self, forward: Callable, args: tuple, kwargs: dict):
        mode = WindowedAttention(self, hidden_states_of(args, kwargs).shape[1])
        with mode:
            output = forward(*args, **kwargs)
        if mode.calls == 0:
            raise UserError(f"{self.where}: its attention processor does not call torch's "
                            f"scaled_dot_product_attention, so {METHOD} cannot restrict it to a window")
        self.geometry = mode.geometry
        return output


# ---- running one layer-step by a method ----------------------------------------------------
@dataclass
class LayerState:
    output: object = None      # the layer's last output (output sharing)
    residual: object = None    # full - window at its last full step that a window step needs


def cond_half(ctx: StepContext, batch: int) -> slice | None:
    """The conditional half of a batched guidance call, or None where the call is not one."""
    halves = ctx.guidance_halves
    if ctx.branch != "both" or halves is None or "cond" not in halves or batch % 2:
        return None
    half = batch // 2
    start = halves.index("cond") * half
    return slice(start, start + half)


def _cut(item, batch: int, part: slice):
    return map_tensors(lambda _, t: t[part] if t.ndim and t.shape[0] == batch else t, item)


def _both_halves(output):
    return map_tensors(lambda _, t: torch.cat([t, t]), output)


def _add(output, residual, part: slice | None):
    kept = tensors_of(residual)
    return map_tensors(lambda i, t: t + (kept[i] if part is None else kept[i][part]), output)


def _subtract(output, other):
    others = tensors_of(other)
    return map_tensors(lambda i, t: t - others[i], output)


def run_method(method: int, forward: Callable, args: tuple, kwargs: dict, ctx: StepContext, state: LayerState,
               window: Window, keep_residual: bool) -> tuple[object, object]:
    """(output, residual of this full step or None) of one attention call by ``method``; the
    state is read, not changed."""
    if method == SHARE:
        return state.output, None
    batch = hidden_states_of(args, kwargs).shape[0]
    part = cond_half(ctx, batch) if method in CFG_SHARED else None
    if part is not None:
        args, kwargs = _cut(args, batch, part), _cut(kwargs, batch, part)
    residual = None
    if method in WINDOWED:
        output = _add(window(forward, args, kwargs), state.residual, part)
    else:
        output = forward(*args, **kwargs)
        if keep_residual:
            residual = _subtract(output, window(forward, args, kwargs))
    if part is not None:
        output = _both_halves(output)
        residual = None if residual is None else _both_halves(residual)
    return output, residual


# ---- the plan ------------------------------------------------------------------------------
def _key(window_size: int, threshold: float, steps: int) -> str:
    return f"s{steps}.w{window_size}.t{threshold:g}"


@dataclass
class FastAttnPlan:
    """Per step and attention layer the method (a code of ``NAMES``), for one window and threshold."""

    methods: torch.Tensor      # (steps, layers) int8
    units: list[str]
    window_size: int
    threshold: float
    tokens: list[int]          # per layer: the attention's sequence length at calibration
    width: list[int]           # per layer: heads x head width
    pairs: list[int]           # per layer: the (query, key) pairs its window attends
    errors: torch.Tensor | None = None   # (steps, layers): the chosen method's error at calibration
    denoiser: str = ""

    @property
    def steps(self) -> int:
        return self.methods.shape[0]

    def need_residual(self) -> torch.Tensor:
        """(steps, layers): the full steps whose residual a window step reads before the next full one."""
        need = torch.zeros(self.methods.shape, dtype=torch.bool)
        for layer in range(self.methods.shape[1]):
            last_full = None
            for step, method in enumerate(self.methods[:, layer].tolist()):
                if method in (FULL, FULL_CFG):
                    last_full = step
                elif method in WINDOWED and last_full is not None:
                    need[last_full, layer] = True
        return need

    def check(self) -> None:
        """A plan a run can follow: each layer starts with a full step, window steps follow one."""
        for layer, unit in enumerate(self.units):
            column = self.methods[:, layer].tolist()
            if column and column[0] not in (FULL, FULL_CFG):
                raise UserError(f"the {METHOD} plan starts {unit} with {NAMES.get(column[0], column[0])}, not full "
                                f"attention; remake it with `{CALIBRATE}`")
            if any(m not in NAMES for m in column):
                raise UserError(f"the {METHOD} plan holds unknown method codes; remake it with `{CALIBRATE}`")

    def counts(self) -> dict[str, int]:
        return {name: int((self.methods == code).sum()) for code, name in NAMES.items()}


def attention_flops(plan: FastAttnPlan, guided: bool = True) -> dict[str, float]:
    """The attention FLOPs of one image's generation under ``plan`` and under full attention.

    Counted: Q K^T and the weighted sum of V, 2 multiply-adds per (query, key) pair and channel:
    4 N^2 C per call for full attention (N tokens, C = heads x head width), 4 P C for the window
    (P its attended pairs), 0 for output sharing; a full step that keeps a residual also computes
    the window.  Guided (``guided``), a call holds both branches: 2 images' worth, of which CFG
    sharing computes one.  The projections, softmax and everything outside attention are not
    counted (the paper's attention FLOPs)."""
    need = plan.need_residual()
    images = 2 if guided else 1
    total = full = 0.0
    for layer in range(len(plan.units)):
        n, c, pairs = plan.tokens[layer], plan.width[layer], plan.pairs[layer]
        dense, windowed = 4.0 * n * n * c, 4.0 * pairs * c
        for step in range(plan.steps):
            method = int(plan.methods[step, layer])
            full += images * dense
            share = 1 if (method in CFG_SHARED and guided) else images
            if method in (FULL, FULL_CFG):
                total += share * (dense + (windowed if need[step, layer] else 0.0))
            elif method in WINDOWED:
                total += share * windowed
    return {"plan": total, "full": full, "fraction": total / full if full else 1.0}


def default_path(model: torch.nn.Module) -> Path | None:
    folder = artifacts.model_folder(model)
    return None if folder is None else artifacts.path(folder, METHOD)


def save_plans(path: str | Path, plans: list[FastAttnPlan], meta: dict | None = None) -> Path:
    """Plans of one model (same layers; any step counts, windows and thresholds) in one file."""
    first = plans[0]
    tensors, windows = {}, {}
    for plan in plans:
        key = _key(plan.window_size, plan.threshold, plan.steps)
        tensors[f"methods.{key}"] = plan.methods.to(torch.int8)
        if plan.errors is not None:
            tensors[f"errors.{key}"] = plan.errors.float()
        windows[str(plan.window_size)] = plan.pairs
    info = {"units": first.units, "steps": sorted({p.steps for p in plans}), "denoiser": first.denoiser,
            "tokens": first.tokens, "width": first.width, "pairs": windows,
            "plans": [[p.window_size, p.threshold, p.steps] for p in plans], **(meta or {})}
    return Calibration(METHOD, tensors, info).save(path)


def load_plans(path: str | Path, window_size: int, threshold: float) -> dict[int, FastAttnPlan]:
    """The plans for ``window_size`` and ``threshold`` in a plan file, by step count (a UserError
    naming the ones it has)."""
    try:
        calibration = Calibration.load(path, METHOD)
    except ValueError as err:
        raise UserError(str(err)) from None
    meta = calibration.meta
    kept = [(int(w), float(t), int(s)) for w, t, s in meta.get("plans", [])]
    match = [(w, t, s) for w, t, s in kept if w == window_size and math.isclose(t, threshold, rel_tol=0, abs_tol=1e-12)]
    if not match:
        have = ", ".join(sorted({f"window_size={w},threshold={t:g}" for w, t, _ in kept})) or "none"
        raise UserError(f"{path} has no {METHOD} plan for window_size={window_size}, threshold={threshold:g} "
                        f"(it has: {have}); make one with `{CALIBRATE} --thresholds {threshold:g} "
                        f"--window-sizes {window_size}` (add --out FILE to keep the others)")
    plans = {}
    for w, t, steps in match:
        key = _key(w, t, steps)
        plan = FastAttnPlan(calibration.tensors[f"methods.{key}"].to(torch.int8), list(meta["units"]), w, t,
                            list(meta["tokens"]), list(meta["width"]), list(meta["pairs"][str(w)]),
                            calibration.tensors.get(f"errors.{key}"), meta.get("denoiser", ""))
        plan.check()
        plans[steps] = plan
    return plans


def load_plan(path: str | Path, window_size: int, threshold: float, steps: int | None = None) -> FastAttnPlan:
    """The plan for ``window_size``, ``threshold`` and ``steps`` (None: the file's only step count)."""
    plans = load_plans(path, window_size, threshold)
    if steps is None and len(plans) == 1:
        return next(iter(plans.values()))
    if steps not in plans:
        raise UserError(f"{path} has {METHOD} plans for {_counts(plans)} steps, not {steps}; make one with "
                        f"`{CALIBRATE} --steps {steps or 'N'} --out FILE`")
    return plans[steps]


def _counts(plans: dict[int, FastAttnPlan]) -> str:
    return ", ".join(str(s) for s in sorted(plans))


def plans_for(model: torch.nn.Module, config: DiTFastAttnConfig) -> dict[int, FastAttnPlan]:
    """The plans ``config`` asks for, by step count: from its file or beside the model, checked
    against the model."""
    path = Path(config.calibration) if config.calibration else \
        (artifacts.find(artifacts.model_folder(model), METHOD) or default_path(model))
    if path is None or not path.is_file():
        where = f"at {path}" if path is not None else f"for this {type(model).__name__} (not loaded from a folder)"
        raise UserError(f"{METHOD} needs a plan made on calibration prompts, and there is none {where}: run "
                        f"`{CALIBRATE}` or pass {METHOD}:calibration=PATH")
    plans = load_plans(path, config.window_size, config.threshold)
    plan = next(iter(plans.values()))
    units = [name for name, _ in self_attentions(model)]
    if plan.units != units or (plan.denoiser and plan.denoiser != type(model).__name__):
        raise UserError(f"the {METHOD} plan in {path} was made for a {plan.denoiser or 'model'} with other attention "
                        f"layers than this {type(model).__name__}; remake it with `{CALIBRATE}` for this model")
    return plans


# ---- inference -----------------------------------------------------------------------------
def self_attentions(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The self- and joint-attention modules of the model's blocks, or a clear error."""
    found = [(name, module) for name, module, cross in adapter_for(model).attentions(model) if not cross]
    if not found:
        names = supported(lambda a: a.family == "dit")
        raise ValueError(f"{METHOD} compresses self-attention; {type(model).__name__} has none in its blocks "
                         f"(transformers: {', '.join(names)})")
    return found


def text_first(model: torch.nn.Module) -> bool:
    """Whether the model's joint attention puts the text tokens before the image tokens (FLUX)."""
    return adapter_for(model).joint_text == "first"


class PlanRunner:
    """Reads the plan of the run's step count for the step of each call (a count without a plan is
    an error)."""

    def __init__(self, plans: dict[int, FastAttnPlan]):
        self.plans = plans
        self.rows = {steps: (plan.methods.tolist(), plan.need_residual().tolist()) for steps, plan in plans.items()}

    def method(self, ctx: StepContext, layer: int) -> tuple[int, bool]:
        steps = ctx.num_steps or (next(iter(self.plans)) if len(self.plans) == 1 else 0)   # 0: unknown
        if steps not in self.plans or ctx.step_index >= steps:
            told = ctx.num_steps or "an unknown number of"
            raise UserError(f"the {METHOD} plans were made for {_counts(self.plans)} steps and this run has {told}; "
                            f"run one of those counts, or make a plan for the count with `{CALIBRATE} --steps N "
                            f"--out FILE` and pass {METHOD}:calibration=FILE")
        methods, need = self.rows[steps]
        return methods[ctx.step_index][layer], need[ctx.step_index][layer]


class FastAttnHook(ModelHook):
    """On one attention module: its call at each step runs by the plan's method."""

    def __init__(self, runner: PlanRunner, states: BranchStates, layer: int, window: Window):
        super().__init__()
        self.runner, self.states, self.layer, self.window = runner, states, layer, window

    def new_forward(self, module, *args, **kwargs):
        ctx = require_step()
        method, keep_residual = self.runner.method(ctx, self.layer)
        state = self.states.get(ctx).setdefault(self.layer, LayerState())
        if (method == SHARE and state.output is None) or (method in WINDOWED and state.residual is None):
            method = FULL   # nothing kept yet (a run that did not start at step 0)
        output, residual = run_method(method, self.fn_ref.original_forward, args, kwargs, ctx, state,
                                      self.window, keep_residual)
        state.output = output
        if residual is not None:
            state.residual = residual
        return output


def apply_ditfastattn(model: torch.nn.Module, config: DiTFastAttnConfig, handle: CacheHandle) -> None:
    layers = self_attentions(model)
    runner = PlanRunner(plans_for(model, config))
    states = BranchStates(dict)
    handle.states.append(states)
    name, first = hook_name(METHOD), text_first(model)
    for index, (unit, module) in enumerate(layers):
        window = Window(config.window_size, first, unit)
        handle.register(module, FastAttnHook(runner, states, index, window), name)


# ---- calibration: the greedy plan ----------------------------------------------------------
def relative_error(output, reference) -> float:
    """sum|output - reference| / sum|reference| over all the tensors of a model's output."""
    pairs = list(zip(tensors_of(output), tensors_of(reference)))
    diff = sum(float((a.float() - b.float()).abs().sum()) for a, b in pairs)
    norm = sum(float(b.float().abs().sum()) for _, b in pairs)
    return diff / max(norm, 1e-12)


def layer_threshold(threshold: float, layer: int, layers: int) -> float:
    """The error layer ``layer`` may bring the model output to: the threshold's share up to it, as
    the error of the layers before stays in the output (the reference code's (l + 1) / L delta)."""
    return threshold * (layer + 1) / layers


class Greedy:
    """Chooses each layer-step's method during one calibration generation (Alg. 1): at each model
    call, layer by layer, the cheapest candidate whose model output stays within the layer's
    threshold of the output with full attention everywhere (the layers before keep their choice)."""

    def __init__(self, layers: int, steps: int, threshold: float):
        self.threshold, self.layers = threshold, layers
        self.methods = torch.full((steps, layers), FULL, dtype=torch.int8)
        self.errors = torch.zeros(steps, layers)
        self.states = BranchStates(dict)
        self.commit = True   # False on the trial forwards: the layers keep nothing

    def available(self, method: int, ctx: StepContext, state: LayerState, batch: int) -> bool:
        if method == SHARE:
            return state.output is not None
        if method in WINDOWED and state.residual is None:
            return False
        return method not in CFG_SHARED or cond_half(ctx, batch) is not None

    def step(self, forward: Callable, args: tuple, kwargs: dict):
        """One model call of the calibration run: decide this step's row, then run it for real."""
        ctx = current_step()
        if ctx is None or ctx.step_index >= self.methods.shape[0]:
            raise ValueError(f"{METHOD} calibration: a call outside the {self.methods.shape[0]} calibrated steps")
        row, batch = ctx.step_index, hidden_states_of(args, kwargs).shape[0]
        states = self.states.get(ctx)
        # step 0 has nothing to share, and threshold 0 admits no error: full attention
        if self.threshold > 0 and any(layer in states for layer in range(self.layers)):
            self.commit = False
            try:
                self.methods[row] = FULL
                reference = forward(*args, **kwargs)
                for layer in range(self.layers):
                    self._choose(row, layer, states.get(layer, LayerState()), ctx, batch, forward, args, kwargs,
                                 reference)
            finally:
                self.commit = True
        return forward(*args, **kwargs)

    def _choose(self, row: int, layer: int, state: LayerState, ctx: StepContext, batch: int, forward: Callable,
                args: tuple, kwargs: dict, reference) -> None:
        bound = layer_threshold(self.threshold, layer, self.layers)
        for method in CANDIDATES:
            if not self.available(method, ctx, state, batch):
                continue
            self.methods[row, layer] = method
            error = relative_error(forward(*args, **kwargs), reference)
            if error < bound:
                self.errors[row, layer] = error
                return
        self.methods[row, layer] = FULL
        self.errors[row, layer] = 0.0

    def run_layer(self, layer: int, forward: Callable, args: tuple, kwargs: dict, window: Window):
        """A layer's call under this step's row; on the committed forward it keeps its output, and
        at every full step its residual (a later step may take the window)."""
        ctx = current_step()
        state = self.states.get(ctx).setdefault(layer, LayerState()) if self.commit else \
            self.states.get(ctx).get(layer, LayerState())
        method = int(self.methods[ctx.step_index, layer])
        output, residual = run_method(method, forward, args, kwargs, ctx, state, window,
                                      self.commit and method in (FULL, FULL_CFG))
        if self.commit:
            state.output = output
            if residual is not None:
                state.residual = residual
        return output


class GreedyLayerHook(ModelHook):
    def __init__(self, greedy: Greedy, layer: int, window: Window):
        super().__init__()
        self.greedy, self.layer, self.window = greedy, layer, window

    def new_forward(self, module, *args, **kwargs):
        return self.greedy.run_layer(self.layer, self.fn_ref.original_forward, args, kwargs, self.window)


class GreedyModelHook(ModelHook):
    def __init__(self, greedy: Greedy):
        super().__init__()
        self.greedy = greedy

    def new_forward(self, module, *args, **kwargs):
        return self.greedy.step(self.fn_ref.original_forward, args, kwargs)


def greedy_plan(model: torch.nn.Module, generate: Callable[[], None], steps: int, window_size: int,
                threshold: float, num_steps: Callable[[], int] | None = None,
                guided: Callable[[], bool] | None = None) -> FastAttnPlan:
    """The plan for one window and threshold, chosen while ``generate()`` runs one generation of
    ``steps`` steps (all calibration prompts in one batch) on ``model``."""
    layers = self_attentions(model)
    greedy = Greedy(len(layers), steps, threshold)
    handle = CacheHandle(METHOD)
    windows = [Window(window_size, text_first(model), unit) for unit, _ in layers]
    try:
        name = hook_name(f"{METHOD}_calibration")
        for index, ((_, module), window) in enumerate(zip(layers, windows)):
            handle.register(module, GreedyLayerHook(greedy, index, window), name)
        handle.register(model, GreedyModelHook(greedy), name)
        handle.track_steps(model, num_steps, guided)
        with torch.no_grad():
            generate()
    finally:
        handle.remove()
    if any(w.geometry is None for w in windows):
        raise ValueError(f"{METHOD} calibration: some attention layers never ran during the calibration generation")
    tokens, width, pairs = zip(*(w.geometry for w in windows))
    return FastAttnPlan(greedy.methods, [unit for unit, _ in layers], window_size, threshold, list(tokens),
                        list(width), list(pairs), greedy.errors, type(model).__name__)


@dataclass
class CalibrationSettings:
    """What ``sdinfer calibrate ditfastattn`` runs: one greedy generation per (window, threshold)."""

    thresholds: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1)
    window_sizes: tuple[int, ...] = (128,)
    steps: tuple[int, ...] = (50,)
    sampler: str = "ddim"
    guidance_scale: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.thresholds = tuple(check_threshold(t) for t in self.thresholds)
        self.window_sizes = tuple(check_window(w) for w in self.window_sizes)
        if not self.thresholds or not self.window_sizes:
            raise UserError(f"{METHOD} calibration needs at least one threshold and one window size")
        self.steps = (self.steps,) if isinstance(self.steps, int) and not isinstance(self.steps, bool) else \
            tuple(self.steps)
        if not self.steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.steps):
            raise UserError(f"{METHOD} calibration needs --steps >= 2 (one or more counts), got {self.steps!r}")


def calibrate_pipeline(pipe, prompts: list[str], settings: CalibrationSettings,
                       log: Callable[[str], None] | None = None) -> list[FastAttnPlan]:
    """Plans for sdinfer's ``Pipeline`` on ``prompts`` (training-like captions, never held-out)."""
    if not prompts:
        raise UserError(f"{METHOD} calibration needs at least one prompt")
    net = pipe.model.denoiser

    plans = []
    for steps in settings.steps:
        def generate() -> None:
            pipe(prompts, steps=steps, sampler=settings.sampler, guidance_scale=settings.guidance_scale,
                 seed=settings.seed)

        for window_size in settings.window_sizes:
            for threshold in settings.thresholds:
                plan = greedy_plan(net, generate, steps, window_size, threshold)
                plans.append(plan)
                if log is not None:
                    flops = attention_flops(plan, guided=settings.guidance_scale != 1)
                    chosen = ", ".join(f"{k} {v}" for k, v in plan.counts().items() if v)
                    log(f"{steps} steps, window {window_size}, threshold {threshold:g}: {chosen}; attention "
                        f"FLOPs {flops['fraction']:.1%} of full")
    return plans
