import pytest
import torch

from sdinfer.models.adapters import ADAPTERS, BlockGroup, ModelAdapter, adapter_for, register_adapter
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


def test_call_signature_is_read_from_the_declaration(monkeypatch):
    """A new class is called as its adapter declares: timestep keyword and scale, pooled keyword,
    fixed extra keywords, learned variance; no code names the class."""
    from types import SimpleNamespace

    from sdinfer.models.adapters import CallSignature
    from sdinfer.models.calling import TextConditioning, call_denoiser

    class ToyDenoiser(torch.nn.Module):
        config = SimpleNamespace(in_channels=3)

        def forward(self, sample, *, timestep, encoder_hidden_states, pooled, extra, return_dict):
            assert extra == "on" and not return_dict
            scale = timestep.view(-1, 1, 1, 1) + pooled.sum(-1).view(-1, 1, 1, 1)
            return (torch.cat([sample * scale, torch.full_like(sample, 7.0)], dim=1),)

    monkeypatch.setitem(ADAPTERS, "ToyDenoiser", ModelAdapter("dit", (), call=CallSignature(
        "keyword", timestep_scale=0.5, pooled="pooled", constants=(("extra", "on"),), learned_variance=True)))
    x = torch.ones(2, 3, 4, 4)
    text = TextConditioning(torch.zeros(2, 5, 8), torch.ones(2, 2))
    out = call_denoiser(ToyDenoiser(), x, torch.tensor([4.0, 8.0]), text)
    assert out.shape == x.shape   # the variance half dropped
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([4.0, 6.0]))   # t * 0.5 + sum(pooled)
    with pytest.raises(ValueError, match="ToyDenoiser needs a pooled text embedding"):
        call_denoiser(ToyDenoiser(), x, torch.tensor(4.0), TextConditioning(torch.zeros(2, 5, 8)))


def test_calling_has_no_branch_on_a_class_name():
    import inspect

    from sdinfer.models import calling

    source = inspect.getsource(calling)
    for name in ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "Flux"):
        assert name not in source
