"""VQ4DiT: post-training vector quantization of diffusion transformers (Deng et al.,
"VQ4DiT: Efficient Post-Training Vector Quantization for Diffusion Transformers", AAAI 2025,
arXiv 2408.17131; no public code: this follows the method section of the paper, its codebook
initialisation, candidate assignment with softmax ratios, and zero-data block-wise calibration).

Per weight matrix W (out x in; a Conv2d's weight as out x (in kh kw)):

1. Codebook.  The rows are cut into sub-vectors of ``dim`` consecutive weights, w_i in R^d, and a
   per-layer codebook C of ``codebook`` (K) codewords is initialised by k-means on them (seeded,
   k-means++ initialisation, Lloyd iterations).  Bits per weight = log2(K) / d for the codes,
   plus the codebook itself (K d half-precision values, per layer).  ``bits=2``: d=4, K=256 (the
   paper's setting); ``bits=3``: d=2, K=64 (the paper's d=4, K=4096 codebook would be larger than
   most of our small layers' weights).
2. Candidate assignment.  Each sub-vector keeps its n (``candidates``) nearest
   codewords c_i1..c_in and softmax ratios r_i = softmax(a_i), the logits a_i initialised from
   the negative squared distances (scaled by the layer's mean nearest distance); the weight is
   reconstructed as w_i ~ sum_j r_ij c_ij.
3. Zero-image, block-wise calibration.  Each transformer block's inputs and outputs
   are captured from the full-precision model (``Calibration.calls``); the codebooks and ratio
   logits of every layer of the block are learned jointly by Adam on

       L = L_d + lambda(t) L_r,   L_d = sum_outputs ||B(x; W_fp) - B(x; W_vq)||^2 / ||B(x; W_fp)||^2,
                                  L_r = mean_i (1 - max_j r_ij),

   with lambda ramped up linearly (to ``REG_MAX``) so that the ratios end near one-hot; each
   step takes one captured call, ``BATCH`` of its samples.  The code of each sub-vector is then
   its candidate of largest ratio (argmax).  Addition to the paper: the last ``HARD_SHARE`` of the
   steps fine-tune the codebooks alone with those codes fixed (L_d of the hard weights), which
   closes the small gap between the soft and the argmax reconstruction; the codebook is kept.
4. Deviation (data): the paper feeds Gaussian noise latents at each timestep; the calibration
   here runs the full-precision model's own DDIM trajectories from Gaussian noise on training
   captions (the pipeline's text conditioning, no images), so blocks see noise at the first step
   and the model's own latents after it.
5. Block inputs (``inputs``).  ``fp`` (the default, as the paper): every block on the
   full-precision model's inputs.  ``quantized``: blocks are calibrated in forward order, each on
   the inputs the model gives it with the blocks before it already quantized (the captured model
   calls re-run with their argmax codewords), against the full-precision model's outputs of the
   block on the same call, as BRECQ does.  Measured on the default DiT (2 bits, 200 held-out
   prompts): the same PSNR (23.5 dB) and lower adherence (77.5% against 81.5%), so not the default.
6. Scope (``scope``).  ``blocks`` (the default on a DiT): the layers inside the transformer
   blocks, what the paper quantizes (its Fig. 1: "DiT blocks are quantized by VQ"); the time and
   pooled-text embedders and the final norm's projection outside them stay in full precision
   (on the default DiT 5.3% of the weights it would quantize).  ``all``: those too, calibrated layer by layer.

Layers outside the transformer blocks (the time / pooled-text embedders, the final norm's
projection) and every layer of a UNet (which the paper does not target) are calibrated layer by
layer instead: the same loss with L_d the layer's relative output error on its captured inputs
(``Calibration.inputs``), computed exactly on all of them at once through their Gram matrix H,
||(W - W') X||^2 = tr((W - W') H (W - W')^T) (a Conv2d's inputs unfolded into patches).  A layer whose row width is not a multiple of ``dim`` takes the largest
divisor of the width below ``dim`` (with K scaled to keep the bits per weight: K' = 2^(log2 K d'/d)).

Storage: each layer keeps its codebook (K d values at 16 bits), which on the small default models
is not negligible: 2-bit codes take 2.89 bits per weight in all on the default DiT (width 96), 4.18
on the default UNet, whose layers hold as few as 1k weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import UserError
from ..models.adapters import adapter_for
from .base import QuantJob
from .calibration import Captured, detached
from .layers import QuantizedLayer, conv_args, kind_of
from .packing import MAX_BITS
from .rounding import layer_output
from .scalar import rows

DEFAULTS = {2: (4, 256), 3: (2, 64)}      # bits -> (dim, codebook)
KMEANS_ITERS = 25
MAX_CALLS = 16                            # captured block calls kept (evenly spaced)
LAYER_BATCH = 4                           # captured inputs per layer-wise step
REG_MAX = 1.0                             # lambda at the end of the soft phase (L_d is relative)
HARD_SHARE = 0.2                          # last steps: codebooks alone, codes fixed at the argmax
BATCH = 2                                 # samples of a captured block call per step


@dataclass
class VQ4DiTConfig:
    bits: int = 2             # 2 (d=4, K=256) or 3 (d=2, K=64)
    dim: int = 0              # sub-vector length d (0: by bits)
    codebook: int = 0         # codewords K per layer (0: 2^(bits d))
    candidates: int = 3       # nearest codewords per sub-vector whose ratios are learned
    iters: int = 300          # Adam steps per block (per layer where calibrated layer-wise)
    seed: int = 0
    inputs: str = "fp"        # block inputs: "fp" (the float model's) or "quantized" (upstream quantized)
    scope: str = "blocks"     # on a DiT: "blocks" (the transformer blocks' layers) or "all" (the embedders too)

    def __post_init__(self):
        if self.bits not in DEFAULTS:
            raise UserError(f"vq4dit takes bits 2 or 3, not {self.bits}; set dim and codebook for other rates")
        if self.dim < 0 or self.codebook < 0 or self.codebook == 1:
            raise UserError(f"vq4dit dim and codebook must be positive (0 for the bits' default), "
                            f"got dim={self.dim}, codebook={self.codebook}")
        if self.codebook_size > 2 ** MAX_BITS:
            raise UserError(f"vq4dit codebook of {self.codebook_size} words needs codes over {MAX_BITS} bits; "
                            "use a smaller codebook or dim")
        if not 1 <= self.candidates <= self.codebook_size:
            raise UserError(f"vq4dit candidates must be 1 to the codebook size {self.codebook_size}, "
                            f"not {self.candidates}")
        if self.iters < 0:
            raise UserError(f"vq4dit iters must be 0 or more, not {self.iters}")
        if self.inputs not in ("quantized", "fp"):
            raise UserError(f"vq4dit inputs must be 'fp' or 'quantized', not {self.inputs!r}")
        if self.scope not in ("blocks", "all"):
            raise UserError(f"vq4dit scope must be 'blocks' or 'all', not {self.scope!r}")

    @property
    def vector_dim(self) -> int:
        return self.dim or DEFAULTS[self.bits][0]

    @property
    def codebook_size(self) -> int:
        if self.codebook:
            return self.codebook
        if self.dim:
            return 2 ** (self.bits * self.dim)
        return DEFAULTS[self.bits][1]

    @property
    def needs_calibration(self) -> bool:
        return True


# ---------------------------------------------------------------- codebook initialisation


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """(k, d) centroids of the rows of ``x`` (n, d): k-means++ seeding, then Lloyd iterations (at
    most ``iters``, until no point changes cluster); an empty cluster is re-seeded at the point farthest from its centroid."""
    n = x.shape[0]
    k = min(k, n)
    centers = x[torch.randint(n, (1,), generator=gen)]
    nearest = torch.cdist(x, centers).squeeze(1).pow(2)
    for _ in range(1, k):
        probs = nearest / nearest.sum() if float(nearest.sum()) > 0 else torch.full_like(nearest, 1 / n)
        pick = torch.multinomial(probs, 1, generator=gen)
        centers = torch.cat([centers, x[pick]])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(1))
    previous, x_sq = None, x.pow(2).sum(1)
    for _ in range(iters):
        scores = centers.pow(2).sum(1) - 2 * x @ centers.T         # ||x - c||^2 - ||x||^2
        assign = scores.argmin(1)
        if previous is not None and torch.equal(assign, previous):
            break                                            # converged: no point changed cluster
        previous = assign
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        empty = counts.squeeze(1) == 0
        centers = torch.where(empty.unsqueeze(1), centers, sums / counts.clamp(min=1))
        if bool(empty.any()):
            far = (x_sq + scores.gather(1, assign.unsqueeze(1)).squeeze(1)).topk(int(empty.sum())).indices
            centers[empty] = x[far]
    return centers


def layer_dim(width: int, dim: int) -> int:
    """``dim`` if it divides the row width, else its largest divisor below ``dim``."""
    return max(d for d in range(1, min(dim, width) + 1) if width % d == 0)


class VQWeight(torch.nn.Module):
    """One layer's codebook, candidate codewords and ratio logits (steps 1-2)."""

    def __init__(self, weight: torch.Tensor, dim: int, codebook: int, candidates: int, gen: torch.Generator):
        super().__init__()
        self.shape = tuple(weight.shape)
        w = rows(weight).cpu()          # k-means with the CPU generator; moved to the weight's device below
        self.dim = layer_dim(w.shape[1], dim)
        if self.dim != dim:
            codebook = max(2, 2 ** round(math.log2(codebook) * self.dim / dim))
        sub = w.reshape(-1, self.dim)
        self.codebook = torch.nn.Parameter(kmeans(sub, codebook, gen))
        n = min(candidates, self.codebook.shape[0])
        dist = torch.cdist(sub, self.codebook.detach()).pow(2)
        near, idx = dist.topk(n, dim=1, largest=False)
        self.register_buffer("candidates", idx)
        temperature = near[:, 0].mean().clamp(min=1e-12) if n > 1 else torch.tensor(1.0)
        self.logits = torch.nn.Parameter(-(near - near[:, :1]) / temperature)
        self.to(weight.device)

    def ratios(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    def soft_weight(self) -> torch.Tensor:
        """sum_j r_ij c_ij, in the weight's shape."""
        words = self.codebook[self.candidates]                       # (n_sub, n, d)
        return (self.ratios().unsqueeze(2) * words).sum(1).reshape(self.shape)

    def codes(self) -> torch.Tensor:
        best = self.logits.detach().argmax(dim=1, keepdim=True)
        return self.candidates.gather(1, best).squeeze(1)

    def hard_weight(self) -> torch.Tensor:
        """The codewords of the argmax codes (differentiable in the codebook)."""
        return self.codebook[self.codes()].reshape(self.shape)

    def weight(self, hard: bool) -> torch.Tensor:
        return self.hard_weight() if hard else self.soft_weight()

    def ratio_loss(self) -> torch.Tensor:
        return (1 - self.ratios().amax(dim=1)).mean()


# ---------------------------------------------------------------- calibration (step 3)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def relative_error(outputs, targets) -> torch.Tensor:
    """sum over output tensors of ||y - y_fp||^2 / ||y_fp||^2."""
    total = 0.0
    for y, t in zip(_tensors(outputs), _tensors(targets)):
        total = total + F.mse_loss(y.float(), t.float()) / t.float().pow(2).mean().clamp(min=1e-12)
    return total


def _optimize(vqs: list[VQWeight], loss_of, iters: int, gen: torch.Generator) -> None:
    """Adam on the codebooks and logits against ``loss_of(gen, hard=False)`` + lambda(t) L_r, then
    (the last ``HARD_SHARE`` of the steps) on the codebooks alone with the argmax codes fixed."""
    hard_iters = int(iters * HARD_SHARE)
    books, logits = [], []
    for vq in vqs:
        spread = float(vq.codebook.detach().std()) or 1e-3
        books.append({"params": [vq.codebook], "lr": 1e-2 * spread})
        logits.append({"params": [vq.logits], "lr": 5e-2})
    opt = torch.optim.Adam(books + logits)
    soft_iters = iters - hard_iters
    for it in range(soft_iters):
        reg = REG_MAX * (it + 1) / soft_iters
        loss = loss_of(gen, False) + reg * sum(vq.ratio_loss() for vq in vqs) / len(vqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt = torch.optim.Adam([dict(g, lr=g["lr"] / 2) for g in books])
    for _ in range(hard_iters):
        loss = loss_of(gen, True)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sub_batch(item, first: torch.Tensor | None, gen: torch.Generator):
    """``item`` with every tensor of the first input's batch size cut to ``BATCH`` random samples."""
    if first is None or first.ndim == 0 or first.shape[0] <= BATCH:
        return item
    size = first.shape[0]
    keep = torch.randperm(size, generator=gen)[:BATCH]

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[keep] if x.ndim and x.shape[0] == size else x
        if isinstance(x, (tuple, list)):
            return type(x)(cut(i) for i in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x
    return cut(item)


def _spaced(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def calibrate_block(block: torch.nn.Module, vqs: dict[str, VQWeight], calls: list, iters: int,
                    gen: torch.Generator) -> None:
    """Learn the block's codebooks and ratios against its full-precision outputs on ``calls``."""
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def loss_of(g, hard):
        call = calls[int(torch.randint(len(calls), (1,), generator=g))]
        args, kwargs, output = _sub_batch((call.args, call.kwargs, call.output), call.input, g)
        weights = {f"{rel}.weight": vq.weight(hard) for rel, vq in vqs.items()}
        return relative_error(functional_call(block, weights, args, kwargs), output)
    try:
        _optimize(list(vqs.values()), loss_of, iters, gen)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def input_gram(module: torch.nn.Module, samples: list[torch.Tensor]) -> torch.Tensor | None:
    """H = mean over rows of x x^T of the layer's inputs as it multiplies them by its weight rows
    (a Conv2d's unfolded patches), so that ||(W - W') X||^2 = tr((W - W') H (W - W')^T); None for
    a grouped convolution."""
    conv = conv_args(module)
    if conv.get("groups", 1) != 1 or isinstance(conv.get("padding"), str):
        return None
    width = rows(module.weight).shape[1]
    gram, count = torch.zeros(width, width, device=module.weight.device), 0
    for x in samples:
        if kind_of(module) == "conv2d":
            x = F.unfold(x.float(), module.kernel_size, dilation=tuple(conv["dilation"]),
                         padding=tuple(conv["padding"]), stride=tuple(conv["stride"]))
            x = x.transpose(1, 2).reshape(-1, width)
        x = x.to(gram.device).float().reshape(-1, width)
        gram += x.T @ x
        count += x.shape[0]
    return gram / max(count, 1)


def calibrate_layer(module: torch.nn.Module, vq: VQWeight, samples: list[torch.Tensor], iters: int,
                    gen: torch.Generator) -> None:
    """Learn one layer's codebook and ratios against its full-precision output on ``samples``: the
    output error on all of them at once through their Gram matrix (exact for a Linear and an
    ungrouped Conv2d, the bias cancelling), else on ``LAYER_BATCH`` of them per step."""
    kind, conv = kind_of(module), conv_args(module)
    w = module.weight.detach().float()
    gram = input_gram(module, samples)
    if gram is not None:
        w_rows = rows(w)
        energy = ((w_rows @ gram) * w_rows).sum().clamp(min=1e-12)

        def loss_of(g, hard):
            delta = vq.weight(hard).reshape(w_rows.shape) - w_rows
            return ((delta @ gram) * delta).sum() / energy
    else:
        def loss_of(g, hard):
            picks = torch.randint(len(samples), (min(LAYER_BATCH, len(samples)),), generator=g).tolist()
            x = torch.cat([samples[i] for i in picks])
            with torch.no_grad():
                target = layer_output(kind, conv, x, w)
            return relative_error(layer_output(kind, conv, x, vq.weight(hard)), target)
    _optimize([vq], loss_of, iters, gen)


# ---------------------------------------------------------------- the method


def _block_layers(job: QuantJob) -> list[tuple[str, torch.nn.Module, dict[str, str]]]:
    """(block name, block, {target name: name inside the block}) of a DiT's blocks; [] for a UNet."""
    adapter = adapter_for(job.model)
    if adapter.family != "dit":
        return []
    found = []
    for block_name, block in adapter.blocks(job.model):
        inside = {name: name[len(block_name) + 1:] for name in job.targets if name.startswith(f"{block_name}.")}
        if inside:
            found.append((block_name, block, inside))
    return found


def quantized_path_calls(model: torch.nn.Module, block: torch.nn.Module, model_calls: list,
                         weights: dict[str, torch.Tensor]) -> list:
    """The arguments ``block`` takes on each captured model call when the model runs with
    ``weights`` (the quantized layers upstream) in place of its own."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((detached(args), detached(kwargs)))
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for call in model_calls:
                seen_before = len(seen)
                functional_call(model, weights, call.args, call.kwargs)
                if len(seen) != seen_before + 1:
                    raise UserError("vq4dit inputs=quantized needs each block called once per model call; "
                                    "use inputs=fp for this model")
    finally:
        handle.remove()
    return seen


def _calibrate_blocks(job: QuantJob, blocks: list, vqs: dict[str, VQWeight], config: VQ4DiTConfig,
                      gen: torch.Generator) -> None:
    """Step 3 on every block, in forward order (step 5: on the quantized path's inputs or fp ones)."""
    modules = {name: block for name, block, _ in blocks}
    if config.inputs == "quantized":
        modules[""] = job.model
    calls = job.calibration.calls(modules)
    model_calls = calls.pop("", None)
    upstream: dict[str, VQWeight] = {}
    for block_name, block, inside in blocks:
        found = _captured(calls, block_name)
        picks = _spaced(list(range(len(found))), MAX_CALLS)
        block_calls = [found[i] for i in picks]
        if model_calls is not None and upstream:
            weights = {f"{name}.weight": vq.hard_weight().detach() for name, vq in upstream.items()}
            quantized = quantized_path_calls(job.model, block, [model_calls[i] for i in picks], weights)
            block_calls = [Captured(c.model_t, args[0] if args else None, args, kwargs, c.output)
                           for c, (args, kwargs) in zip(block_calls, quantized)]
        calibrate_block(block, {rel: vqs[name] for name, rel in inside.items()}, block_calls, config.iters, gen)
        upstream.update({name: vqs[name] for name in inside})


def _captured(found: dict, name: str) -> list:
    if not found.get(name):
        raise UserError(f"module {name} was never called on the calibration trajectories; it cannot be "
                        "calibrated (is it used by this pipeline?)")
    return found[name]


def quantize_vq4dit(job: QuantJob, config: VQ4DiTConfig) -> dict[str, QuantizedLayer]:
    if job.calibration is None:
        raise UserError("vq4dit calibrates on the model's own trajectories: quantize a pipeline, not a bare model")
    gen = torch.Generator().manual_seed(config.seed)
    blocks = _block_layers(job)
    in_blocks = {name for _, _, inside in blocks for name in inside}
    rest = {} if blocks and config.scope == "blocks" else \
        {name: module for name, module in job.targets.items() if name not in in_blocks}
    chosen = {name: module for name, module in job.targets.items() if name in in_blocks or name in rest}
    vqs = {name: VQWeight(module.weight, config.vector_dim, config.codebook_size, config.candidates, gen)
           for name, module in chosen.items()}
    if blocks:
        _calibrate_blocks(job, blocks, vqs, config, gen)
    if rest:
        inputs = job.calibration.inputs(rest)
        for name, module in rest.items():
            samples = [c.input for c in _captured(inputs, name)]
            calibrate_layer(module, vqs[name], samples, config.iters, gen)
    out = {}
    for name, module in chosen.items():
        vq = vqs[name]
        out[name] = QuantizedLayer.from_codes(module, vq.codes(), vq.codebook.detach().clone(), None,
                                              f"vq{vq.dim}x{vq.codebook.shape[0]}", vector=vq.dim)
    return out
