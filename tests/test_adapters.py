import pytest
import torch

from sdinfer.models.adapters import BlockGroup, ModelAdapter, adapter_for, register_adapter
from sdinfer.models.loading import load_model


def _block_count(model) -> int:
    """3 down + mid + 3 up blocks for the UNet; one per layer for the transformer."""
    config = model.config
    if "num_layers" in config:
        return config["num_layers"]
    return len(config["down_block_types"]) + 1 + len(config["up_block_types"])


@pytest.mark.parametrize("name,family", [("unet", "unet"), ("dit", "dit")])
def test_default_models_blocks(name, family):
    model = load_model(name).denoiser
    count = _block_count(model)
    assert count >= 4
    adapter = adapter_for(model)
    assert adapter.family == family
    names = [n for n, _ in adapter.blocks(model)]
    assert len(names) == count and len(set(names)) == count


def test_unknown_class_names_the_supported_ones():
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        adapter_for(torch.nn.Linear(2, 2))


def test_declared_adapter_for_a_new_class():
    class ToyTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    register_adapter("ToyTransformer", ModelAdapter("dit", (BlockGroup("layers"),)))
    assert [n for n, _ in adapter_for(ToyTransformer()).blocks(ToyTransformer())] == \
        ["layers.0", "layers.1", "layers.2"]
