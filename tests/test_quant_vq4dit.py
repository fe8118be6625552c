"""VQ4DiT: learned codebook assignments, storage of the codes, a quantized DiT, bad configs."""

import pytest
import torch
from torch.func import functional_call

from sdinfer.errors import UserError
from sdinfer.quant import CalibrationConfig, parse_spec, quantize
from sdinfer.quant.layers import QuantizedLayer
from sdinfer.quant.rounding import layer_output
from sdinfer.quant.calibration import Captured
from sdinfer.quant.vq4dit import (VQ4DiTConfig, VQWeight, calibrate_block, calibrate_layer, kmeans, layer_dim,
                                  relative_error)

TINY_CALIB = CalibrationConfig(prompts=1, steps=1, rows=64)


def _layer(out_features=48, in_features=96, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    # rows of unequal scale, input channels of unequal energy: a layer where the output error
    # differs from the weight error
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 2.0, out_features).unsqueeze(1))
    inputs = [torch.randn(64, in_features) * torch.linspace(0.1, 3.0, in_features) for _ in range(8)]
    return layer, inputs


def _output_error(layer, weight, inputs):
    return sum(float((layer_output("linear", {}, x, weight) - layer_output("linear", {}, x, layer.weight)).pow(2)
                     .sum()) for x in inputs)


@pytest.fixture(scope="module")
def dit_pipe():
    from sdinfer.pipeline import Pipeline

    return Pipeline.from_pretrained("dit")


def _block_calls(block, n=4, seed=0):
    """Gaussian-noise inputs to one MM-DiT block and its full-precision outputs (zero data)."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(n):
        kwargs = {"hidden_states": torch.randn(2, 32, 96, generator=gen),
                  "encoder_hidden_states": torch.randn(2, 8, 96, generator=gen),
                  "temb": torch.randn(2, 96, generator=gen)}
        with torch.no_grad():
            calls.append(Captured(0.0, kwargs["hidden_states"], (), kwargs, block(**kwargs)))
    return calls


def _block_error(block, weights, calls):
    with torch.no_grad():
        return sum(float(relative_error(functional_call(block, weights, c.args, c.kwargs), c.output))
                   for c in calls)


def test_learned_assignment_reconstructs_the_block_better(dit_pipe):
    from sdinfer.accelerate import denoiser_of

    model, _ = denoiser_of(dit_pipe)
    block = model.transformer_blocks[1]
    calls = _block_calls(block)
    gen = torch.Generator().manual_seed(0)
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"]   # a few, to keep it fast
    vqs = {n: VQWeight(block.get_submodule(n).weight, 4, 64, 3, gen) for n in names}

    def hard():
        return {f"{n}.weight": vq.hard_weight().detach() for n, vq in vqs.items()}
    kmeans_err = _block_error(block, hard(), calls)
    calibrate_block(block, vqs, calls, iters=40, gen=gen)
    learned_err = _block_error(block, hard(), calls)
    random = {f"{n}.weight": vq.codebook.detach()[torch.randint(vq.codebook.shape[0], vq.codes().shape,
                                                                generator=gen)].reshape(vq.shape)
              for n, vq in vqs.items()}
    random_err = _block_error(block, random, calls)
    assert learned_err < 0.7 * kmeans_err, (learned_err, kmeans_err)
    assert learned_err < 0.1 * random_err, (learned_err, random_err)
    assert all(p.requires_grad for p in block.parameters())       # the block is left trainable as it was
    assert float(sum(vq.ratios().detach().amax(dim=1).mean() for vq in vqs.values())) / len(vqs) > 0.8  # L_r: one-hot


def test_learned_assignment_reconstructs_a_layer_better():
    layer, inputs = _layer()
    gen = torch.Generator().manual_seed(0)
    vq = VQWeight(layer.weight, 4, 64, 3, gen)
    with torch.no_grad():
        kmeans_err = _output_error(layer, vq.hard_weight(), inputs)
    calibrate_layer(layer, vq, inputs, iters=80, gen=gen)
    with torch.no_grad():
        random_codes = torch.randint(vq.codebook.shape[0], vq.codes().shape, generator=gen)
        random_err = _output_error(layer, vq.codebook[random_codes].reshape(layer.weight.shape), inputs)
        learned_err = _output_error(layer, vq.hard_weight(), inputs)
    assert learned_err < 0.97 * kmeans_err, (learned_err, kmeans_err)
    assert learned_err < 0.1 * random_err


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centers])
    found = kmeans(points, 4, gen)
    dist = torch.cdist(centers, found)
    assert float(dist.min(dim=1).values.max()) < 0.2


@pytest.mark.parametrize("bits, dim, words", [(2, 4, 256), (3, 2, 64)])
def test_codes_take_the_bits_and_round_trip(bits, dim, words):
    config = parse_spec(f"vq4dit:bits={bits}")
    assert (config.vector_dim, config.codebook_size) == (dim, words)
    layer, _ = _layer(out_features=384, in_features=96)
    vq = VQWeight(layer.weight, config.vector_dim, config.codebook_size, 3, torch.Generator().manual_seed(0))
    q = QuantizedLayer.from_codes(layer, vq.codes(), vq.codebook.detach(), None, "vq", vector=vq.dim)
    assert q.code_bits * 1.0 / dim == bits
    assert torch.equal(q.codes(), vq.codes())
    assert torch.allclose(q.dequantized_weight(), vq.hard_weight().detach())
    codebook_bits = words * dim * 16 + 384 * 16          # codebook and the (unit) row scales
    assert q.storage_bits() == q.numel * bits + codebook_bits
    x = torch.randn(5, 96)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, vq.hard_weight().detach(), layer.bias), atol=1e-5)


def test_width_not_a_multiple_of_dim_takes_a_divisor():
    assert layer_dim(96, 4) == 4 and layer_dim(6, 4) == 3 and layer_dim(7, 4) == 1
    layer = torch.nn.Linear(6, 32)
    vq = VQWeight(layer.weight, 4, 256, 3, torch.Generator().manual_seed(0))
    assert vq.dim == 3 and vq.codebook.shape == (64, 3)       # K' = 2^(8 * 3 / 4): still 2 bits a weight


def test_bad_configs_name_the_fix():
    with pytest.raises(UserError, match="bits 2 or 3"):
        parse_spec("vq4dit:bits=5")
    with pytest.raises(UserError, match="bits 2 or 3"):
        VQ4DiTConfig(bits=4)
    with pytest.raises(UserError, match="candidates"):
        parse_spec("vq4dit:candidates=0")
    with pytest.raises(UserError, match="over 16 bits"):
        parse_spec("vq4dit:bits=3,dim=8")
    with pytest.raises(UserError, match="inputs must be 'fp' or 'quantized'"):
        parse_spec("vq4dit:inputs=int8")
    with pytest.raises(UserError, match="scope must be 'blocks' or 'all'"):
        parse_spec("vq4dit:scope=attention")


@pytest.mark.parametrize("scope, inputs", [("blocks", "quantized"), ("all", "fp")])
def test_scope_chooses_the_layers_and_quantized_inputs_calibrate(dit_pipe, scope, inputs):
    handle = quantize(dit_pipe, f"vq4dit:bits=2,codebook=16,iters=2,scope={scope},inputs={inputs}", TINY_CALIB)
    try:
        outside = {n for n in handle.layers if not n.startswith("transformer_blocks.")}
        if scope == "blocks":    # the embedders and the final projection stay float, as in the paper
            assert not outside and isinstance(handle.model.get_submodule("norm_out.linear"), torch.nn.Linear)
        else:
            assert "time_text_embed.timestep_embedder.linear_1" in outside
        assert torch.isfinite(dit_pipe(["a red circle"], steps=2, seed=0).pixels).all()
    finally:
        handle.remove()


def test_vq4dit_dit_generates_finite_images(dit_pipe, tmp_path):
    from sdinfer.quant.folder import read_metadata

    pipe = dit_pipe
    handle = quantize(pipe, "vq4dit:bits=2,codebook=16,iters=2", TINY_CALIB)
    try:
        layers = handle.layers.values()
        assert len(handle.layers) > 10 and all(layer.vector == 4 and layer.code_bits == 4 for layer in layers)
        assert 1.0 < handle.bits_per_weight() < 1.5      # 4-bit codes per 4 weights, plus codebooks
        images = pipe(["a red circle"], steps=2, seed=0).pixels
        assert torch.isfinite(images).all()
        saved = handle.save(tmp_path / "q")                     # the codebooks and codes on disk
        tensors, meta = read_metadata(next(saved.rglob("sdinfer_quantized.safetensors")).parent)
        name, layer = next(iter(handle.layers.items()))
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        loaded = QuantizedLayer.from_layout(meta["layers"][name], own)
        assert loaded.vector == 4 and torch.equal(loaded.dequantized_weight(), layer.dequantized_weight())
    finally:
        handle.remove()
