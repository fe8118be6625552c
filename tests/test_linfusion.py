"""LinFusion: the linear attention, its mounting on UNets, its errors and its resumable training."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer import cache
from sdinfer.distill import linfusion as lf
from sdinfer.errors import UserError
from sdinfer.models import artifacts
from sdinfer.models.calling import TextConditioning, call_denoiser
from sdinfer.pipeline import Pipeline
from tiny_pipelines import build_tiny_sd, build_tiny_sd3


def _default_call(pipe, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.tensor([900, 300])[:batch]
    text = pipe.encode(["a red circle", ""][:batch])
    with torch.no_grad():
        return call_denoiser(pipe.model.denoiser, x, t, text)


def test_linear_attention_equals_the_explicit_kernel_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 8, generator=g) for _ in range(3))
    out = lf.linear_attention(q, k, v)
    # the same attention written out as an n x n weight matrix of kernel similarities
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    sim = fq @ fk.transpose(-1, -2) / 50
    reference = (sim @ v) / (sim.sum(-1, keepdim=True) + lf.EPS)
    assert out.shape == v.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # normalization-aware: repeating every token leaves each output unchanged
    twice = lf.linear_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2))
    torch.testing.assert_close(twice, out, rtol=1e-5, atol=1e-5)


def test_module_starts_from_the_original_projections():
    unet = build_tiny_sd().unet
    where, attn = lf.self_attention_layers(unet)[0]
    assert not attn.is_cross_attention and where.endswith("attn1")
    module = lf.LinearSelfAttention.from_attention(attn, mid=16)
    x = torch.randn(2, 64, attn.to_q.in_features)
    assert torch.equal(module.f_q(x), torch.zeros_like(x)) and torch.equal(module.f_k(x), torch.zeros_like(x))
    assert torch.equal(module.to_q.weight, attn.to_q.weight) and torch.equal(module.to_out.bias, attn.to_out[0].bias)
    out = module(x)
    assert out.shape == (2, 64, attn.to_out[0].out_features)
    # the attention's whole output (its processor keeps residual and rescale) has the original's shape
    assert lf.run_in_place_of(attn, module, x).shape == attn(x).shape


def _tiny_unet_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 500]), encoder_hidden_states=text).sample


def test_mounts_on_a_tiny_diffusers_unet_and_removes_exactly(tmp_path):
    unet = build_tiny_sd().unet.eval()
    before = _tiny_unet_call(unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = lf.build_modules(unet, mid=8)
    for m in modules.values():   # a trained refiner is not zero
        torch.nn.init.normal_(m.f_q.fc2.weight, std=0.5)
    file = lf.save(tmp_path / "linfusion.safetensors", unet, modules, steps=0)
    handle = cache.apply(unet, lf.LinFusionConfig(weights=str(file)))
    mounted = _tiny_unet_call(unet)
    assert mounted.shape == before.shape and not torch.allclose(mounted, before, atol=1e-4)
    handle.remove()
    assert torch.equal(_tiny_unet_call(unet), before)
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_default_unet_apply_remove_is_bit_exact(unet_pipe, tmp_path):
    unet = unet_pipe.model.denoiser
    assert len(lf.self_attention_layers(unet)) == 4   # the 8x8 level: down, mid and two up blocks
    before = _default_call(unet_pipe)
    file = lf.save(tmp_path / "w.safetensors", unet, lf.build_modules(unet), steps=0)
    handle = sdinfer.accelerate(unet_pipe, f"linfusion:weights={file}")
    linear = _default_call(unet_pipe)
    assert not torch.equal(linear, before)   # the untrained linear attention differs from softmax
    handle.remove()
    assert torch.equal(_default_call(unet_pipe), before)


def test_a_dit_is_refused():
    dit = build_tiny_sd3().transformer
    with pytest.raises(UserError, match="SD3Transformer2DModel.*ditfastattn"):
        cache.apply(dit, lf.LinFusionConfig())


def test_missing_weights_name_the_command():
    unet = build_tiny_sd().unet   # built in memory: no folder, no file beside it
    with pytest.raises(UserError, match="sdinfer distill linfusion --model MODEL"):
        cache.apply(unet, lf.LinFusionConfig())
    with pytest.raises(artifacts.MissingArtifact, match="sdinfer distill linfusion"):
        cache.apply(unet, lf.LinFusionConfig(weights="/nonexistent/linfusion.safetensors"))


def test_weights_of_another_model_are_refused(unet_pipe, tmp_path):
    tiny = build_tiny_sd().unet
    file = lf.save(tmp_path / "tiny.safetensors", tiny, lf.build_modules(tiny), steps=0)
    with pytest.raises(UserError, match="other layers"):
        sdinfer.accelerate(unet_pipe, f"linfusion:weights={file}")
    # same layer names, another width
    unet = unet_pipe.model.denoiser
    modules = lf.build_modules(unet)
    for where, m in modules.items():
        modules[where] = lf.LinearSelfAttention(m.dim, m.inner, 2, m.mid, m.to_out.out_features)
    file = lf.save(tmp_path / "heads.safetensors", unet, modules, steps=0)
    with pytest.raises(UserError, match="trained for shape"):
        sdinfer.accelerate(unet_pipe, f"linfusion:weights={file}")
    assert all(not getattr(attn, "_diffusers_hook", None) or not attn._diffusers_hook.hooks
               for _, attn in lf.self_attention_layers(unet))   # a refused mount leaves no hook behind


def test_training_resumes_exactly(unet_pipe, tmp_path):
    from sdinfer.distill.linfusion_train import LinFusionTrainConfig, train

    settings = dict(model="unet", steps=4, layerwise_steps=1, batch_size=2, checkpoint_every=2, warmup=2)
    threads = torch.get_num_threads()
    try:   # one thread: small ops on a busy machine run slower on two
        whole = train(LinFusionTrainConfig(**settings), tmp_path / "whole", threads=1, pipe=unet_pipe)
        first = train(LinFusionTrainConfig(**settings), tmp_path / "parts", threads=1, pipe=unet_pipe, stop_at=2)
        assert first.step == 2
        resumed = train(LinFusionTrainConfig(**settings), tmp_path / "parts", threads=1, pipe=unet_pipe)
    finally:
        torch.set_num_threads(threads)
    assert resumed.step == 4
    a, b = whole.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    fresh = lf.build_modules(unet_pipe.model.denoiser)
    moved = [not torch.equal(fresh[w].to_q.weight, whole.modules[w].to_q.weight) for w in fresh]
    assert any(moved)   # training changed the stand-ins
    out = whole.export(tmp_path / "out.safetensors")
    _, meta = artifacts.read(out, "w", "x", json_keys=("layers", "training_steps"))
    assert meta["training_steps"] == 4 and len(meta["layers"]) == 4


@pytest.mark.slow   # loads a shipped model (and unet-64 runs at 64x64)
@pytest.mark.parametrize("name", ["unet", "unet-64"])
def test_shipped_weights_load_and_change_the_output(name, tmp_path):
    pipe = Pipeline.from_pretrained(name)
    shipped = artifacts.find(pipe.model.path, "linfusion")
    assert shipped is not None, f"{name} ships no linfusion weights"
    _, meta = artifacts.read(shipped, "w", "x", json_keys=("training_steps",))
    assert meta["model_class"] == "UNet2DConditionModel" and meta["training_steps"] > 0
    size = pipe.model.native_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    text = pipe.encode(["a blue square on the left", ""])

    def call(spec):
        handle = sdinfer.accelerate(pipe, spec) if spec else None
        try:
            with torch.no_grad():
                return call_denoiser(pipe.model.denoiser, x, torch.tensor([900, 300]), text)
        finally:
            if handle is not None:
                handle.remove()

    softmax = call("")
    distilled = call("linfusion")
    untrained = lf.save(tmp_path / "untrained.safetensors", pipe.model.denoiser,
                        lf.build_modules(pipe.model.denoiser), steps=0)
    start = call(f"linfusion:weights={untrained}")
    assert not torch.equal(distilled, softmax)
    # distilled: closer to the softmax model's prediction than the stand-ins it started from
    assert (distilled - softmax).norm() < 0.5 * (start - softmax).norm()
