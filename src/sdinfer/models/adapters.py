"""Model adapters: for each diffusers model family, how it is called and where its blocks are.

Accelerators (caches, attention, quantization, parallel strategies) speak to
an adapter, never to a model class: the adapter names the module lists that
hold the model's blocks and what each block returns, and ``call_denoiser``
reads the family's call signature (``CallSignature``) off it.  Adapters are
declared as data, so a new diffusers class with a known block pattern and
call signature is supported by one more entry in ``ADAPTERS`` (or
``register_adapter``), with no new code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class BlockGroup:
    """A module list (or single module) of blocks, by attribute path."""

    path: str               # e.g. "down_blocks" or "mid_block"
    returns: str = "hidden"  # "hidden", "hidden+skips" (UNet down blocks), "encoder+hidden" (MM-DiT)
    # children of each block whose outputs are attention / MLP results, added to the residual
    # stream after the block's own gating (what FORA-style caches reuse); absent ones are skipped
    sublayers: tuple[str, ...] = ()
    # sub-modules (dotted paths) of each block that act on the text tokens alone: an MM-DiT's
    # text stream, which takes the place of cross-attention; absent ones are skipped
    text_stream: tuple[str, ...] = ()
    # module lists inside each block whose members are its layer blocks (a UNet block's resnets
    # and attentions): the units that Block Caching and Learning-to-Cache cache one by one
    layers: tuple[str, ...] = ()
    # how each block modulates its input by the timestep (the input TeaCache watches, read
    # off the first block): "adaln-emb" (its norm1(x, emb=temb): SD3 / FLUX joint blocks),
    # "basic" (a BasicTransformerBlock, by its norm_type), "resnet" (a UNet block's first ResNet:
    # norm1(x) shifted by time_emb_proj(temb)); "" where none is declared
    modulation: str = ""
    # a UNet's "down", "mid" or "up" blocks: the encoder, bottleneck and decoder paths between which
    # the skip connections run (what DeepCache cuts); "" for a plain stack
    role: str = ""


def _child(block: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:   # absent, or None in this block (e.g. SD3's last block has no ff_context)
        return None


def _attention_modules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The diffusers attention modules in ``block`` (not those nested inside another one)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in block.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) and \
                not any(name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


@dataclass(frozen=True)
class CallSignature:
    """How a family's ``forward`` takes the sample, the timestep and the text, and what it returns.

    The sample always goes first; the text's token states go as ``encoder_hidden_states``."""

    timestep: str = "positional"    # "positional" (the second argument) or "keyword" (timestep=...)
    # the model timestep (0..N-1, or t N on a flow schedule) is multiplied by this first: FLUX takes
    # the flow time t itself (diffusers' FluxPipeline divides its timesteps by 1000)
    timestep_scale: float = 1.0
    pooled: str = ""                # the keyword taking the pooled text vector; "" where none is taken
    # keywords passed with fixed values (PixArt's added_cond_kwargs without micro-conditioning)
    constants: tuple[tuple[str, object], ...] = ()
    # >1: the model takes the latent as tokens of (packing x packing) patches, (B, h w / p^2, C p^2),
    # with the position ids ``img_ids`` (0, row, column) and ``txt_ids`` (zeros), and returns tokens
    # of the same layout (FLUX, packed by its pipeline rather than by a patch embedding)
    packing: int = 1
    # (keyword, value): a guidance scale distilled into the model, passed where the model's config
    # has ``guidance_embeds`` (FLUX.1-dev; diffusers' FluxPipeline default 3.5)
    embedded_guidance: tuple[str, float] | None = None
    # the output may carry learned variance channels after the prediction (DiT, PixArt): where it
    # has twice the sample's channels, the first half is kept
    learned_variance: bool = False


@dataclass(frozen=True)
class ModelAdapter:
    family: str                  # "unet" or "dit"
    groups: tuple[BlockGroup, ...]
    call: CallSignature = CallSignature()
    conditioning: str = "text"   # "text" (prompts) or "class" (class labels, e.g. DiT)
    # (first, last): the modules whose outputs open and close the per-token image stream
    # (batch, tokens, width), the patch embedding and the final projection before unpatchifying;
    # between them every op but attention is token-local (what sequence parallelism shards)
    image_tokens: tuple[str, ...] = ()
    # the temporal path: modules (fnmatch patterns on qualified names) whose outputs depend on the
    # timestep (and, where the model adds a pooled text or class embedding to it, on that), not on
    # the image: the time embedding and each block's projection of it (what TFM-PTQ treats apart)
    temporal: tuple[str, ...] = ()
    # where a joint attention puts the text tokens it appends to the image tokens of its call:
    # "last" (SD3's processors: image, then text) or "first" (FLUX: text, then image)
    joint_text: str = "last"

    def grouped(self, model: torch.nn.Module):
        """(group, qualified name, block) of every block, in forward order."""
        for group in self.groups:
            mod = model.get_submodule(group.path)
            if isinstance(mod, torch.nn.ModuleList):
                yield from ((group, f"{group.path}.{i}", m) for i, m in enumerate(mod))
            else:
                yield group, group.path, mod

    def blocks(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every block, in forward order."""
        return [(name, block) for _, name, block in self.grouped(model)]

    def blocks_in(self, model: torch.nn.Module, role: str) -> list[torch.nn.Module]:
        """The blocks of the groups declared with ``role`` ("down", "mid", "up"), in forward order."""
        return [block for group, _, block in self.grouped(model) if group.role == role]

    def sublayers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every declared attention / MLP child, in forward order."""
        return [(f"{name}.{child}", getattr(block, child)) for group, name, block in self.grouped(model)
                for child in group.sublayers if getattr(block, child, None) is not None]

    def layer_blocks(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every layer block, in forward order: the members of the
        declared layer lists, interleaved by index (resnet 0, attention 0, resnet 1, ...), or where
        none are declared the attention / MLP sub-layers."""
        found = []
        for group, name, block in self.grouped(model):
            lists = [(child, getattr(block, child, None) or ()) for child in group.layers]
            for i in range(max((len(members) for _, members in lists), default=0)):
                found += [(f"{name}.{child}.{i}", members[i]) for child, members in lists if i < len(members)]
        return found or self.sublayers(model)

    def attentions(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
        """(qualified name, module, is cross-attention) of every diffusers attention module in
        the blocks, block by block: found by type, so any declared class is covered."""
        return [(f"{name}.{child}", module, bool(getattr(module, "is_cross_attention", False)))
                for _, name, block in self.grouped(model) for child, module in _attention_modules(block)]

    def text_stream(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every declared text-stream sub-module, in forward order."""
        return [(f"{name}.{path}", module) for group, name, block in self.grouped(model)
                for path in group.text_stream if (module := _child(block, path)) is not None]


UNET_LAYERS = ("resnets", "attentions")
UNET = ModelAdapter("unet", (BlockGroup("down_blocks", "hidden+skips", layers=UNET_LAYERS, modulation="resnet",
                                        role="down"),
                             BlockGroup("mid_block", layers=UNET_LAYERS, role="mid"),
                             BlockGroup("up_blocks", layers=UNET_LAYERS, role="up")),
                    call=CallSignature(learned_variance=True),
                    temporal=("time_embedding.*", "add_embedding.*", "*.time_emb_proj"))
# diffusers' BasicTransformerBlock: self-attention, cross-attention (if any), feed-forward
TRANSFORMER = ModelAdapter("dit", (BlockGroup("transformer_blocks", sublayers=("attn1", "attn2", "ff"),
                                                modulation="basic"),), image_tokens=("pos_embed", "proj_out"),
                           call=CallSignature("keyword", learned_variance=True, constants=(
                               ("added_cond_kwargs", {"resolution": None, "aspect_ratio": None}),)),
                           temporal=("adaln_single.*",))
DIT = ModelAdapter("dit", TRANSFORMER.groups, conditioning="class", image_tokens=("pos_embed", "proj_out_2"),
                   call=CallSignature(learned_variance=True),
                   temporal=("*.norm1.emb.*", "*.norm1.linear", "proj_out_1"))
# the timestep (plus pooled text) embedding of MM-DiTs and the adaptive norms that project it
ADALN_TEMPORAL = ("time_text_embed.*", "*.norm1.linear", "*.norm1_context.linear", "*.norm.linear",
                  "norm_out.linear")
# MM-DiT joint blocks: the text tokens' projections in the joint attention and their MLP
JOINT_TEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context")
MMDIT = ModelAdapter("dit", (BlockGroup("transformer_blocks", "encoder+hidden",
                                        sublayers=("attn", "attn2", "ff", "ff_context"),
                                        text_stream=JOINT_TEXT_STREAM, modulation="adaln-emb"),),
                    image_tokens=("pos_embed", "proj_out"),
                    call=CallSignature("keyword", pooled="pooled_projections"), temporal=ADALN_TEMPORAL)
FLUX = ModelAdapter("dit", (BlockGroup("transformer_blocks", "encoder+hidden",
                                       sublayers=("attn", "ff", "ff_context"), text_stream=JOINT_TEXT_STREAM,
                                       modulation="adaln-emb"),
                            BlockGroup("single_transformer_blocks", "encoder+hidden",
                                       sublayers=("attn", "proj_mlp", "proj_out"))),
                    call=CallSignature("keyword", timestep_scale=1e-3, pooled="pooled_projections", packing=2,
                                       embedded_guidance=("guidance", 3.5)),
                    temporal=ADALN_TEMPORAL, joint_text="first")

ADAPTERS: dict[str, ModelAdapter] = {
    "UNet2DConditionModel": UNET,
    "PixArtTransformer2DModel": TRANSFORMER,
    "DiTTransformer2DModel": DIT,
    "SD3Transformer2DModel": MMDIT,
    "FluxTransformer2DModel": FLUX,
}


def register_adapter(class_name: str, adapter: ModelAdapter) -> None:
    ADAPTERS[class_name] = adapter


def supported(predicate) -> list[str]:
    """Names of the classes whose adapters satisfy ``predicate`` (for error messages)."""
    return sorted(name for name, adapter in ADAPTERS.items() if predicate(adapter))


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no adapter for {name}; supported: {', '.join(sorted(ADAPTERS))} "
                         "(declare one with sdinfer.models.adapters.register_adapter)")
    return ADAPTERS[name]
