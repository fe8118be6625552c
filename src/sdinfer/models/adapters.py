"""Model adapters: for each diffusers model family, where its blocks are.

Accelerators (caches, attention, quantization, parallel strategies) speak to
an adapter, never to a model class: the adapter names the module lists that
hold the model's blocks and what each block returns.  Adapters are declared as
data, so a new diffusers class with a known block pattern is supported by one
more entry in ``ADAPTERS`` (or ``register_adapter``), with no new code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockGroup:
    """A module list (or single module) of blocks, by attribute path."""

    path: str               # e.g. "down_blocks" or "mid_block"
    returns: str = "hidden"  # "hidden", "hidden+skips" (UNet down blocks), "encoder+hidden" (MM-DiT)
    # children of each block whose outputs are attention / MLP results, added to the residual
    # stream after the block's own gating (what FORA-style caches reuse); absent ones are skipped
    sublayers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelAdapter:
    family: str                  # "unet" or "dit"
    groups: tuple[BlockGroup, ...]

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

    def sublayers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every declared attention / MLP child, in forward order."""
        return [(f"{name}.{child}", getattr(block, child)) for group, name, block in self.grouped(model)
                for child in group.sublayers if getattr(block, child, None) is not None]


UNET = ModelAdapter("unet", (BlockGroup("down_blocks", "hidden+skips"), BlockGroup("mid_block"),
                             BlockGroup("up_blocks")))
# diffusers' BasicTransformerBlock: self-attention, cross-attention (if any), feed-forward
TRANSFORMER = ModelAdapter("dit", (BlockGroup("transformer_blocks", sublayers=("attn1", "attn2", "ff")),))
MMDIT = ModelAdapter("dit", (BlockGroup("transformer_blocks", "encoder+hidden",
                                        sublayers=("attn", "attn2", "ff", "ff_context")),))
FLUX = ModelAdapter("dit", (BlockGroup("transformer_blocks", "encoder+hidden",
                                       sublayers=("attn", "ff", "ff_context")),
                            BlockGroup("single_transformer_blocks", "encoder+hidden",
                                       sublayers=("attn", "proj_mlp", "proj_out"))))

ADAPTERS: dict[str, ModelAdapter] = {
    "UNet2DConditionModel": UNET,
    "PixArtTransformer2DModel": TRANSFORMER,
    "DiTTransformer2DModel": TRANSFORMER,
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
