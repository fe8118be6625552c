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


@dataclass(frozen=True)
class ModelAdapter:
    family: str                  # "unet" or "dit"
    groups: tuple[BlockGroup, ...]

    def blocks(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) of every block, in forward order."""
        out = []
        for group in self.groups:
            mod = model.get_submodule(group.path)
            if isinstance(mod, torch.nn.ModuleList):
                out += [(f"{group.path}.{i}", m) for i, m in enumerate(mod)]
            else:
                out.append((group.path, mod))
        return out


UNET = ModelAdapter("unet", (BlockGroup("down_blocks", "hidden+skips"), BlockGroup("mid_block"),
                             BlockGroup("up_blocks")))
TRANSFORMER = ModelAdapter("dit", (BlockGroup("transformer_blocks"),))

ADAPTERS: dict[str, ModelAdapter] = {
    "UNet2DConditionModel": UNET,
    "PixArtTransformer2DModel": TRANSFORMER,
    "DiTTransformer2DModel": TRANSFORMER,
    "SD3Transformer2DModel": ModelAdapter("dit", (BlockGroup("transformer_blocks", "encoder+hidden"),)),
}


def register_adapter(class_name: str, adapter: ModelAdapter) -> None:
    ADAPTERS[class_name] = adapter


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no adapter for {name}; supported: {', '.join(sorted(ADAPTERS))} "
                         "(declare one with sdinfer.models.adapters.register_adapter)")
    return ADAPTERS[name]
