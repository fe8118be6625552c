"""PipeFusion: patch-level pipeline parallelism for diffusion transformers (approximate).

Fang et al., "PipeFusion: Patch-level Pipeline Parallelism for Diffusion Transformers
Inference" (2024; xDiT's ``pipefusion``).  The transformer blocks are split into N
stages, one per rank, contiguous and as even as possible (rank r holds ``stage_blocks(L, N, r)``
of the L blocks); the image tokens are split into M patches (``patches``, default N),
contiguous runs of S / M tokens (whole rows of the latent where M divides its rows).  Stage n
computes patch m while stage n - 1 computes patch m + 1: the ranks exchange only the
activations of a patch, point to point, and each rank runs only its own blocks.

- **Stale K/V.**  Every self- / joint-attention layer keeps a full-sequence buffer of its image
  keys and values.  When patch m arrives, its fresh K/V overwrite slice m of the buffer and its
  queries attend to the whole buffer, whose other slices are fresh (patches before m, this
  step) or one step stale (patches after m); the text tokens of an MM-DiT's joint attention
  add their own fresh K/V.  Token-local ops (norms, MLPs, adaLN, cross-attention to the text)
  work on a patch unchanged.  The buffers persist across steps and start over with a new
  generation (``ctx.generation``), guidance branch or sample shape.
- **Warm-up.**  The first ``warmup_steps`` steps of a generation (default 1, xDiT's default;
  at least the first step, whatever the knob, since the buffers must hold something) send
  the whole sequence through the stages as one patch: exact, and it fills the buffers.
- **Text stream (MM-DiT, SD3).**  As in xDiT, the text tokens go through the blocks with the
  first patch of a step only: each block keeps the text input it saw then and every later
  patch of the step reuses it (their text outputs are dropped), so the text stream crosses a
  stage boundary once a step.
- **Output.**  The last stage projects each patch's tokens (the final projection, the module
  the model adapter names last in ``image_tokens``) and broadcasts them as soon as they are
  there (asynchronously); at the end of the step every rank has the whole model output and
  the sampler runs replicated.

Hooks, no edit to the model: on the model, its forward runs once per patch (M passes a step,
one in warm-up); on the patch embedding (the adapter's first ``image_tokens`` module), each
pass returns its patch's tokens; on every block, one of another stage passes its input on
untouched, the stage's first block swaps in the activations received from the previous
stage and its last one sends its output on; on the stage's attention modules, the
``scaled_dot_product_attention`` call is intercepted as sequence parallelism does and runs
over the buffer; on the final projection, see Output.

Communicated per model call, rank r to rank r + 1 (``start_send``, each posted as soon as the
patch leaves the stage; rank r + 1 posts the receive of patch m + 1 before computing patch m):
the patches' hidden states and, with the first patch, the text stream; then the last rank
broadcasts the M patch outputs (``start_broadcast``).

Bytes per step (one model call; float32: 4 bytes an element; B the batch of the call, S image
tokens, C the blocks' hidden width, T text tokens and C_T their width (MM-DiT; 0 otherwise),
P the final projection's output width (patch_size^2 x out channels), N ranks, M patches,
1 in a warm-up step):

- each stage boundary (sent by rank r < N - 1): M patches of B (S / M) C, plus B T C_T once:
  4 (B S C + B T C_T);
- the model output (sent by rank N - 1): M patches of B (S / M) P to N - 1 ranks:
  4 B S P (N - 1);

so 4 (N - 1) (B S C + B T C_T + B S P) over all ranks, whatever M (tested).

Approximate after the warm-up (stale K/V; PSNR >= 30 dB against one device on the default
DiT, tested); exact during it (max abs error <= 1e-5 in float32, tested).  Unlike the paper,
a step ends with the whole output on every rank (the sampler is not split into patches), so
the pipeline drains at each step's end instead of flowing into the next step.  Every rank
also runs the model's cheap prelude and final norm (patch embedding, timestep and text
embeddings: they give the shapes and the adaLN conditioning every stage needs).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..cache.base import BranchStates, CacheHandle, hidden_states_of, hook_name, require_step
from ..errors import UserError
from ..models.adapters import adapter_for
from .comm import Communicator, Pending
from .sequence_parallel import DistributedAttentionHook, _attention_layers


@dataclass
class PipeFusionConfig:
    """``pipefusion``: blocks in one pipeline stage per rank, image tokens in ``patches`` patches
    (None: one per rank) pipelined through them after ``warmup_steps`` exact steps."""

    warmup_steps: int = 1
    patches: int | None = None
    exact = False   # stale activations: caching them would reuse features that are stale already (as xDiT)

    def __post_init__(self) -> None:
        if isinstance(self.patches, str):   # parsed from a spec: the default None gives no type
            try:
                self.patches = int(self.patches)
            except ValueError:
                raise ValueError(f"pipefusion option patches={self.patches!r} is not a whole number") from None
        if self.patches is not None and (isinstance(self.patches, bool) or not isinstance(self.patches, int)
                                         or self.patches < 1):
            raise ValueError(f"pipefusion needs patches >= 1 (or none: one per rank), got {self.patches!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"pipefusion needs warmup_steps, a whole number >= 0, got {self.warmup_steps!r}")

    def check_world_size(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"pipefusion runs one pipeline stage per rank: it needs a world size of at "
                             f"least 2, got {size}")


def stage_blocks(num_blocks: int, size: int, rank: int) -> range:
    """The blocks of rank ``rank``'s stage: contiguous, the first ``num_blocks % size`` stages one longer."""
    base, extra = divmod(num_blocks, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class _Buffers:
    """Per guidance branch: each attention layer's image K/V over the whole sequence."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, shape) -> None:
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shape = shape     # of the model's sample the buffers belong to
        self.ready = False     # a whole call filled them


class _Schedule:
    """What the hooks of one applied pipefusion share: this rank's stage, the patch under way
    in the model call under way, the transfers in flight, the K/V buffers."""

    def __init__(self, comm: Communicator, config: PipeFusionConfig, stage: range):
        self.comm, self.stage = comm, stage
        self.patches = config.patches or comm.size
        self.warmup_steps = config.warmup_steps
        self.is_first, self.is_last = comm.rank == 0, comm.rank == comm.size - 1
        self.states = BranchStates(_Buffers)
        self.end()

    # ---- one model call: `count` patches, each a pass of the model's forward -------------
    def begin(self, buffers: _Buffers, count: int) -> None:
        self.buffers, self.count = buffers, count

    def end(self) -> None:
        self.buffers: _Buffers | None = None
        self.count = self.index = self.tokens = 0
        self.embedded: torch.Tensor | None = None
        self.text_in: dict[int, torch.Tensor] = {}     # each own block's text input of the first patch
        self.receiving: Pending | None = None
        self.sends: list[Pending] = []
        self.outputs: list[Pending] = []

    @property
    def span(self) -> tuple[int, int]:
        """The image tokens of the patch under way."""
        return self.index * self.tokens // self.count, (self.index + 1) * self.tokens // self.count

    def embed(self, tokens: torch.Tensor) -> None:
        if tokens.shape[1] % self.patches:
            fits = [m for m in range(2, min(tokens.shape[1], 64) + 1) if tokens.shape[1] % m == 0][:6]
            raise UserError(f"pipefusion splits the image tokens into {self.patches} patches of equal size, and "
                            f"{tokens.shape[1]} tokens do not divide by {self.patches}; choose patches that "
                            f"divide {tokens.shape[1]} (e.g. {', '.join(map(str, fits)) or 1}) or another "
                            "image size")
        self.embedded, self.tokens = tokens, tokens.shape[1]

    # ---- point to point between neighbouring stages ------------------------------------------
    def send(self, hidden: torch.Tensor, text: torch.Tensor | None) -> None:
        parts = [hidden.reshape(-1)] + ([text.reshape(-1).to(hidden.dtype)] if text is not None else [])
        self.sends.append(self.comm.start_send(torch.cat(parts) if len(parts) > 1 else parts[0], self.comm.rank + 1))

    def receive(self, hidden_like: torch.Tensor, text_like: torch.Tensor | None):
        """The previous stage's output for the patch under way (with the first patch, its text
        stream too), shaped like ``hidden_like`` / ``text_like``; the next patch's receive is
        posted before returning, so it arrives while this one computes."""
        with_text = text_like is not None and self.index == 0
        size = hidden_like.numel() + (text_like.numel() if with_text else 0)
        if self.receiving is None:
            self.receiving = self.comm.start_recv(hidden_like.new_empty(size), self.comm.rank - 1)
        flat, self.receiving = self.receiving.wait(), None
        if self.index + 1 < self.count:
            self.receiving = self.comm.start_recv(hidden_like.new_empty(hidden_like.numel()), self.comm.rank - 1)
        hidden = flat[:hidden_like.numel()].view(hidden_like.shape)
        text = flat[hidden_like.numel():].view(text_like.shape).to(text_like.dtype) if with_text else None
        return hidden, text

    def settle(self) -> None:
        for pending in self.sends:
            pending.wait()


class PipelineHook(ModelHook):
    """On the model: each call runs its forward once per patch (once in a warm-up step)."""

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule = schedule

    def new_forward(self, module, *args, **kwargs):
        s = self.schedule
        ctx = require_step()
        buffers = s.states.get(ctx)
        shape = tuple(hidden_states_of(args, kwargs).shape)
        if buffers.shape != shape:
            buffers.reset(shape)
        pipelined = buffers.ready and ctx.step_index >= s.warmup_steps
        s.begin(buffers, s.patches if pipelined else 1)
        try:
            for index in range(s.count):
                s.index = index
                out = self.fn_ref.original_forward(*args, **kwargs)
            s.settle()
            buffers.ready = True
        except BaseException:
            buffers.reset(None)
            raise
        finally:
            s.end()
        return out


class PatchEmbedHook(ModelHook):
    """On the patch embedding: the tokens of the patch under way (embedded once a call)."""

    def __init__(self, schedule: _Schedule):
        super().__init__()
        self.schedule = schedule

    def new_forward(self, module, *args, **kwargs):
        s = self.schedule
        if s.index == 0:
            s.embed(self.fn_ref.original_forward(*args, **kwargs))
        start, end = s.span
        return s.embedded[:, start:end]


class StageBlockHook(ModelHook):
    """On every transformer block: a block of another stage passes its input on untouched; the
    first block of this stage takes the previous stage's activations instead of its input,
    the last one sends its output on.  ``joint``: the block takes and returns the text stream
    too (``(encoder_hidden_states, hidden_states)``, an MM-DiT block)."""

    def __init__(self, schedule: _Schedule, index: int, joint: bool, name: str):
        super().__init__()
        self.schedule, self.index, self.joint, self.name = schedule, index, joint, name
        self.signature: inspect.Signature | None = None

    def new_forward(self, module, *args, **kwargs):
        s = self.schedule
        if self.signature is None:
            self.signature = inspect.signature(type(module).forward)
        bound = self.signature.bind(module, *args, **kwargs)
        inputs = bound.arguments
        if self.index not in s.stage:
            return (inputs["encoder_hidden_states"], inputs["hidden_states"]) if self.joint else inputs["hidden_states"]
        if self.index == s.stage.start and not s.is_first:
            text_like = inputs["encoder_hidden_states"] if self.joint else None
            inputs["hidden_states"], text = s.receive(inputs["hidden_states"], text_like)
            if text is not None:
                inputs["encoder_hidden_states"] = text
        if self.joint:
            if s.index == 0:
                s.text_in[self.index] = inputs["encoder_hidden_states"]
            else:
                inputs["encoder_hidden_states"] = s.text_in[self.index]
        out = self.fn_ref.original_forward(*bound.args[1:], **bound.kwargs)
        if self.index == s.stage.stop - 1 and not s.is_last:
            text, hidden = out if self.joint else (None, out)
            if self.joint and s.index == 0 and text is None:
                raise UserError(f"pipefusion: {self.name}, the last block of rank {s.comm.rank}'s stage, returns "
                                "no text stream for the next stage")
            s.send(hidden, text if s.index == 0 else None)
        return out


class StaleKVAttention:
    """The attention of one self- / joint-attention layer over its full-sequence K/V buffer
    (called by ``DistributedAttentionHook`` with the SDPA call's q, k, v: the patch's image
    tokens first, then any text tokens)."""

    def __init__(self, schedule: _Schedule, name: str):
        self.schedule, self.name = schedule, name

    def __call__(self, comm, q, k, v, tokens: int, scale: float) -> torch.Tensor:
        s = self.schedule
        start, end = s.span
        if end - start != tokens:
            raise UserError(f"pipefusion: {self.name} sees {tokens} image tokens, not the {end - start} of the "
                            "patch under way; its hidden states are not the image tokens")
        kv = s.buffers.kv
        if s.count == 1:   # the whole sequence: plain attention, and the buffer starts over
            kv[self.name] = (k[:, :, :tokens].clone(), v[:, :, :tokens].clone())
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if self.name not in kv:
            raise UserError(f"pipefusion: {self.name} kept no K/V from an earlier step; did it skip the warm-up?")
        keys, values = kv[self.name]
        keys[:, :, start:end] = k[:, :, :tokens]
        values[:, :, start:end] = v[:, :, :tokens]
        if k.shape[2] > tokens:   # joint attention: the text tokens' fresh K/V after the image's
            keys, values = torch.cat([keys, k[:, :, tokens:]], dim=2), torch.cat([values, v[:, :, tokens:]], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)


class PatchOutputHook(ModelHook):
    """On the final projection: the last stage projects the patch under way and broadcasts it;
    after the last patch every rank returns the whole sequence's projection (before that, a
    placeholder of its shape, which the model unpatchifies and the model hook drops)."""

    def __init__(self, schedule: _Schedule, width: int):
        super().__init__()
        self.schedule, self.width = schedule, width

    def new_forward(self, module, hidden, *args, **kwargs):
        s = self.schedule
        if s.is_last:
            out = self.fn_ref.original_forward(hidden, *args, **kwargs)
        else:   # what the broadcast fills: nothing computed here
            out = hidden.new_empty(*hidden.shape[:-1], self.width)
        s.outputs.append(s.comm.start_broadcast(out, s.comm.size - 1))
        if s.index < s.count - 1:
            return hidden.new_zeros(hidden.shape[0], s.tokens, self.width)
        return torch.cat([pending.wait() for pending in s.outputs], dim=1)


def apply_pipefusion(model: torch.nn.Module, config: PipeFusionConfig, handle: CacheHandle,
                     comm: Communicator) -> None:
    layers = _attention_layers(model, "pipefusion")
    adapter = adapter_for(model)
    blocks = list(adapter.grouped(model))
    if len(blocks) < comm.size:
        fix = (f"use a world size of at most {len(blocks)}" if len(blocks) >= 2 else
               "pipefusion needs a model of 2 blocks or more; use another strategy")
        raise ValueError(f"pipefusion gives each rank a stage of at least one transformer block, and "
                         f"{type(model).__name__} has {len(blocks)} block{'s' * (len(blocks) != 1)} for "
                         f"{comm.size} ranks; {fix}")
    first, last = adapter.image_tokens
    projection = model.get_submodule(last)
    width = getattr(projection, "out_features", None)
    if not isinstance(width, int):
        raise ValueError(f"pipefusion broadcasts the final projection's output, and {last} of "
                         f"{type(model).__name__} ({type(projection).__name__}) declares no out_features")
    stage = stage_blocks(len(blocks), comm.size, comm.rank)
    schedule = _Schedule(comm, config, stage)
    name = hook_name("pipefusion")
    handle.register(model, PipelineHook(schedule), name)
    handle.register(model.get_submodule(first), PatchEmbedHook(schedule), name)
    for index, (group, block_name, block) in enumerate(blocks):
        handle.register(block, StageBlockHook(schedule, index, group.returns == "encoder+hidden", block_name), name)
        if index in stage:
            for layer, module in layers:
                if layer.startswith(f"{block_name}."):
                    handle.register(module, DistributedAttentionHook(StaleKVAttention(schedule, layer), comm,
                                                                     f"pipefusion attention {layer}"), name)
    handle.register(projection, PatchOutputHook(schedule, width), name)
    handle.states.append(schedule.states)
    # the step context of a stock diffusers pipeline: ``parallel.apply`` installs the tracker
    # (outermost, after this hook) for every strategy
