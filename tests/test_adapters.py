import pytest
import torch

from sdinfer.models.adapters import BlockGroup, ModelAdapter, adapter_for, register_adapter
from sdinfer.models.loading import load_model


@pytest.mark.parametrize("name,family,count", [("unet", "unet", 7), ("dit", "dit", 6)])
def test_default_models_blocks(name, family, count):
    model = load_model(name).denoiser
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
