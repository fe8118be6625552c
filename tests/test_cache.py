"""Feature caches: the skipped blocks really are skipped, refresh-every-step is exact, removal
restores the model, state is per generation; on the default models and on stock diffusers
pipelines built from tiny random models."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.errors import UserError
from sdinfer.eval.metrics import psnr
from sdinfer.models.adapters import BlockGroup, ModelAdapter, register_adapter
from sdinfer.samplers import SAMPLERS, get_sampler
from sdinfer.samplers.base import steps_one_by_one

from cache_helpers import CallCounter, assert_exact, assert_new_generation_starts_clean, tiny_transformers

PROMPT = "a red circle in the top left"


def _generate(pipe, steps=6, sampler="ddim", cfg=4.0):
    return pipe([PROMPT], steps=steps, sampler=sampler, guidance_scale=cfg).pixels


@pytest.mark.slow
def test_deepcache_skips_the_deep_path_on_the_default_unet(unet_pipe):
    net = unet_pipe.model.denoiser
    deep, shallow = CallCounter(net.mid_block.resnets[0]), CallCounter(net.down_blocks[0].resnets[0])
    base = _generate(unet_pipe)
    assert (deep.calls, shallow.calls) == (6, 6)
    handle = sdinfer.accelerate(unet_pipe, "deepcache:interval=3")
    try:
        cached = _generate(unet_pipe)
    finally:
        handle.remove()
    assert (deep.calls, shallow.calls) == (6 + 2, 6 + 6)   # full steps 0 and 3 only
    assert not torch.equal(cached, base)
    assert torch.equal(_generate(unet_pipe), base)          # removed: exactly the uncached model


@pytest.mark.slow
def test_deepcache_layer_branch_skips_inside_the_branch_blocks(unet_pipe):
    """DeepCache's branch id 0 (block 0, layer 0): of the shallow blocks only the last up layer runs."""
    net = unet_pipe.model.denoiser
    down, first_up, last_up = (CallCounter(m.conv1) for m in (net.down_blocks[0].resnets[0],
                                                                  *net.up_blocks[-1].resnets))
    base = _generate(unet_pipe)
    handle = sdinfer.accelerate(unet_pipe, "deepcache:interval=3,layer=0")
    try:
        cached = _generate(unet_pipe)
    finally:
        handle.remove()
    assert (down.calls, first_up.calls, last_up.calls) == (6 + 2, 6 + 2, 6 + 6)
    assert not torch.equal(cached, base)


@pytest.mark.slow
def test_caches_refreshing_every_step_are_exact(unet_pipe, dit_pipe):
    for pipe, spec in [(unet_pipe, "deepcache:interval=1"), (unet_pipe, "deepcache:interval=1,branch=1"),
                       (unet_pipe, "deepcache:interval=1,layer=0"),
                       (dit_pipe, "fora:interval=1"), (dit_pipe, "fbcache:threshold=0")]:
        assert_exact(_generate, pipe, spec)


@pytest.mark.slow
def test_fora_skips_attention_and_mlp_on_the_default_dit(dit_pipe):
    block = dit_pipe.model.denoiser.transformer_blocks[1]
    attn, mlp = CallCounter(block.attn.to_q), CallCounter(block.ff.net[0])
    handle = sdinfer.accelerate(dit_pipe, "fora:interval=3")
    try:
        _generate(dit_pipe)
    finally:
        handle.remove()
    assert (attn.calls, mlp.calls) == (3, 3)   # steps 0, 3 and the last (5)


@pytest.mark.slow
def test_fbcache_skips_the_blocks_after_the_first_on_the_default_dit(dit_pipe):
    base = _generate(dit_pipe, steps=50)
    first = CallCounter(dit_pipe.model.denoiser.transformer_blocks[0].attn.to_q)
    later = CallCounter(dit_pipe.model.denoiser.transformer_blocks[3].attn.to_q)
    handle = sdinfer.accelerate(dit_pipe, "fbcache:threshold=0.08")
    try:
        cached = _generate(dit_pipe, steps=50)
    finally:
        handle.remove()
    assert first.calls == 50 and later.calls < 35   # measured: 24 of 50 steps computed
    assert psnr(cached, base) > 30.0


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["deepcache:interval=3", "deepcache:interval=2,schedule=nonuniform",
                                  "fbcache:threshold=0.1"])
def test_a_new_generation_starts_clean(unet_pipe, dit_pipe, spec):
    assert_new_generation_starts_clean(_generate, dit_pipe if spec.startswith("fbcache") else unet_pipe, spec)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [s for s in sorted(SAMPLERS) if steps_one_by_one(get_sampler(s))])
def test_caches_compose_with_every_sampler(unet_pipe, sampler):
    base = _generate(unet_pipe, steps=20, sampler=sampler)
    handle = sdinfer.accelerate(unet_pipe, "deepcache:interval=2")
    try:
        cached = _generate(unet_pipe, steps=20, sampler=sampler)
    finally:
        handle.remove()
    assert not torch.equal(cached, base)
    # measured 33.7-37.9 dB; PLMS 23.9 dB: its four-output history amplifies any perturbation
    # (uncached, its own error at 20 steps is 15x DDIM's: bench/results/error_vs_nfe_unet.md)
    assert psnr(cached, base) >= (20.0 if sampler == "plms" else 30.0)


STEPS_COMPOSED = 20   # fewer leave too few full steps for interval 3 (TaylorSeer + 3M: 10.8 dB at 12)
EVERY_METHOD = [("unet", "deepcache:interval=3", "heun"), ("unet", "taylorseer:interval=3", "dpm-solver++-3m"),
                ("unet", "teacache:threshold=0.15", "heun"), ("unet", "magcache:threshold=0.12", "dpm-solver++-3m"),
                ("unet", "blockcache:threshold=0.07", "heun"), ("unet", "tgate", "dpm-solver++-3m"),
                ("dit", "fora:interval=3", "heun"), ("dit", "fbcache:threshold=0.12", "dpm-solver++-3m"),
                ("dit", "dbcache:threshold=0.12", "heun"), ("dit", "taylorseer:interval=3", "dpm-solver++-3m"),
                ("dit", "teacache:threshold=0.15", "dpm-solver++-3m"), ("dit", "magcache:threshold=0.12", "heun"),
                ("dit", "blockcache:threshold=0.07", "dpm-solver++-3m"), ("dit", "tgate", "heun")]


@pytest.mark.slow
@pytest.mark.parametrize("model, spec, sampler", EVERY_METHOD,
                         ids=[f"{m}-{s.split(':')[0]}-{x}" for m, s, x in EVERY_METHOD])
def test_every_method_composes_with_a_two_call_or_a_multistep_sampler(unet_pipe, dit_pipe, model, spec, sampler):
    """Heun calls the model twice a step, DPM-Solver++ 3M keeps three outputs of earlier steps:
    each method skips work (the output changes) and stays near the uncached run, and its removal
    restores the model exactly.  (Learning-to-Cache's routers are specific to DDIM's one call a
    step at the calibrated count; DeepCache runs every sampler in the test above.)"""
    pipe = unet_pipe if model == "unet" else dit_pipe
    base = _generate(pipe, steps=STEPS_COMPOSED, sampler=sampler)
    handle = sdinfer.accelerate(pipe, spec)
    try:
        cached = _generate(pipe, steps=STEPS_COMPOSED, sampler=sampler)
    finally:
        handle.remove()
    assert torch.equal(_generate(pipe, steps=STEPS_COMPOSED, sampler=sampler), base)
    assert not torch.equal(cached, base)
    # 20 steps leave few full ones (FORA interval 3 with DPM-Solver++ 3M: 20.8 dB); T-GATE drops
    # the guidance after its gate (22-29 dB at 50 steps, BENCHMARKS.md)
    assert psnr(cached, base) >= (15.0 if spec == "tgate" else 18.0)


def test_deepcache_in_a_stock_stable_diffusion_pipeline():
    from tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd()
    deep = CallCounter(pipe.unet.mid_block.resnets[0])

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    base = run()
    assert deep.calls == 6   # guidance batched: one call per step
    for spec, calls, exact in [("deepcache:interval=3", 2, False), ("deepcache:interval=1", 6, True)]:
        handle = sdinfer.accelerate(pipe, spec)
        deep.calls = 0
        try:
            out = run()
            again = run()   # a second generation through the same pipeline: the tracker restarts
        finally:
            handle.remove()
        assert deep.calls == 2 * calls, spec
        assert torch.equal(out, again)
        assert torch.equal(out, base) == exact, spec
    assert torch.equal(run(), base)


def test_fora_in_a_stock_pixart_pipeline():
    from tiny_pipelines import build_tiny_pixart

    pipe = build_tiny_pixart()
    attn = CallCounter(pipe.transformer.transformer_blocks[0].attn1.to_q)

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images

    base = run()
    attn.calls = 0
    handle = sdinfer.accelerate(pipe, "fora:interval=3")
    try:
        run()
        assert attn.calls == 3
        handle.remove()
        handle = sdinfer.accelerate(pipe, "fora:interval=1")
        assert torch.equal(run(), base)
    finally:
        handle.remove()


@pytest.mark.parametrize("spec, computed", [("fora:interval=3", 2),   # steps 0 and 3 (no known last step)
                                            ("fbcache:threshold=100", 1),   # only the first call
                                            ("fbcache:threshold=0", 6)])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["SD3Transformer2DModel", "FluxTransformer2DModel",
                                                   "DiTTransformer2DModel"])
def test_transformer_caches_on_each_transformer_class(index, spec, computed):
    model, call, leaf = tiny_transformers()[index]
    counter = CallCounter(leaf)
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0, 10.0]).view(-1, 1)
    with torch.no_grad():
        base = [call(t) for t in timesteps]
        handle = sdinfer.accelerate(model, spec)
        counter.calls = 0
        try:
            cached = [call(t) for t in timesteps]
        finally:
            handle.remove()
    assert counter.calls == computed
    assert torch.equal(cached[0], base[0])
    assert torch.equal(cached[1], base[1]) == (computed == 6)


def test_a_declared_adapter_makes_a_new_class_cacheable():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())

        def forward(self, x, scale):
            return x + scale * self.mixer(x) + scale * self.mlp(x)

    class NewTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, timestep):
            for layer in self.layers:
                x = layer(x, timestep / 1000)
            return x

    register_adapter("NewTransformer", ModelAdapter("dit", (BlockGroup("layers", sublayers=("mixer", "mlp")),)))
    model = NewTransformer()
    counter = CallCounter(model.layers[1].mixer[0])
    handle = sdinfer.accelerate(model, "fora:interval=2")
    try:
        outs = [model(torch.ones(1, 4), torch.tensor(t)) for t in (900.0, 600.0, 300.0, 100.0)]
    finally:
        handle.remove()
    assert counter.calls == 2
    # a cached step reuses the sub-layers' outputs under the fresh scale
    fresh = model(torch.ones(1, 4), torch.tensor(600.0))
    assert not torch.equal(outs[1], fresh)


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    ("nocache:interval=2", "unknown cache method 'nocache'"),
    ("deepcache:intervl=2", "deepcache has no option 'intervl'"),
    ("deepcache:interval=0", "interval must be a whole number >= 1"),
    ("deepcache:interval=two", "is not a int"),
    ("deepcache:branch=5", "branch 5 leaves no deep block"),
    ("deepcache:schedule=cubic", "schedule must be one of uniform, nonuniform"),
    ("deepcache:layer=-2", "layer must be a whole number >= 0, or -1"),
    ("deepcache:layer=2", "layer 2 is not a layer of branch 0's blocks, which have 2 up layers"),
    ("fora:interval=-1", "interval must be a whole number >= 1"),
    ("fbcache:threshold=-0.1", "threshold must be >= 0"),
    ("fbcache:warmup=1.5", "warmup must be a whole number >= 0"),
    ("", "empty accelerator spec"),
])
def test_bad_specs_are_clear_errors(unet_pipe, spec, message):
    with pytest.raises(UserError, match=message):
        sdinfer.accelerate(unet_pipe, spec)
    assert not hasattr(unet_pipe.model.denoiser, "_diffusers_hook") or \
        not unet_pipe.model.denoiser._diffusers_hook.hooks   # nothing left installed


@pytest.mark.slow
def test_a_method_on_a_family_it_does_not_support_names_the_supported(unet_pipe, dit_pipe):
    with pytest.raises(UserError, match="deepcache supports UNets.*UNet2DConditionModel"):
        sdinfer.accelerate(dit_pipe, "deepcache")
    with pytest.raises(UserError, match="fora supports transformers.*SD3Transformer2DModel"):
        sdinfer.accelerate(unet_pipe, "fora")
    with pytest.raises(UserError, match="fbcache supports transformers.*FluxTransformer2DModel"):
        sdinfer.accelerate(unet_pipe, "fbcache")
    with pytest.raises(UserError, match="no adapter for Linear"):
        sdinfer.accelerate(torch.nn.Linear(2, 2), "fora")


@pytest.mark.slow
def test_generate_and_bench_take_accelerate(tmp_path, capsys):
    import json

    from PIL import Image
    from test_cli import run

    out = tmp_path / "c.png"
    code, stdout, err = run(capsys, "generate", PROMPT, "-o", str(out), "--steps", "6", "--quiet",
                            "--accelerate", "deepcache:interval=3")
    assert code == 0, err
    assert "deepcache:interval=3" in stdout
    assert Image.open(out).text["accelerate"] == "deepcache:interval=3"
    code, _, err = run(capsys, "generate", PROMPT, "-o", str(tmp_path / "d.png"), "--quiet",
                       "--accelerate", "deepcache:interval=zero")
    assert code == 2 and "deepcache option interval='zero'" in err and not (tmp_path / "d.png").exists()
    code, _, err = run(capsys, "generate", PROMPT, "-o", str(tmp_path / "e.png"), "--quiet", "--model", "dit",
                       "--accelerate", "deepcache")
    assert code == 2 and "deepcache supports UNets" in err
    report = tmp_path / "b.json"
    code, stdout, err = run(capsys, "bench", "--model", "dit", "--steps", "6", "--limit", "2", "--repeats", "1",
                            "--accelerate", "fora:interval=2", "--accelerate", "fora:interval=3",
                            "--json", str(report))
    assert code == 0, err
    records = json.loads(report.read_text())["records"]
    assert [r["accelerate"] for r in records] == ["", "fora:interval=2", "fora:interval=3"]
    assert records[0]["psnr"] == 100.0 and records[1]["psnr"] < 100.0
    assert records[2]["macs"] < records[1]["macs"] < records[0]["macs"]   # skipped work is not counted


def test_train_default_help_names_the_shipped_settings(capsys):
    from test_cli import run

    from sdinfer.models.default.architectures import TRAIN_OVERRIDES


    with pytest.raises(SystemExit):
        run(capsys, "train-default", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for arch, settings in TRAIN_OVERRIDES.items():
        assert f"{arch} {settings['steps']}" in text and f"{arch} {settings['batch_size']}" in text


@pytest.mark.slow
def test_a_cached_model_runs_under_torch_compile():
    from tiny_pipelines import build_tiny_sd

    pipe = build_tiny_sd()

    def run():
        return pipe("a red circle", num_inference_steps=6, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base = run()
    handle = sdinfer.accelerate(pipe, "deepcache:interval=3")
    try:
        eager = run()
        pipe.unet = torch.compile(pipe.unet)
        compiled = run()
    finally:
        handle.remove()
    assert not torch.equal(eager, base)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_step_tracker_finds_a_positional_timestep():
    """SD3's forward takes the timestep fourth: (hidden, encoder, pooled, timestep)."""
    sd3, _, leaf = tiny_transformers()[0]
    counter = CallCounter(leaf)
    handle = sdinfer.accelerate(sd3, "fora:interval=3")
    try:
        with torch.no_grad():
            for t in (900.0, 700.0, 500.0, 300.0):
                sd3(torch.ones(1, 4, 8, 8), torch.ones(1, 3, 16), torch.ones(1, 8), torch.tensor([t]),
                    return_dict=False)
    finally:
        handle.remove()
    assert counter.calls == 2   # steps 0 and 3: read as four steps, not one step called four times


def test_deepcache_nonuniform_schedule_is_denser_around_its_center():
    from sdinfer.cache import DeepCacheConfig

    steps = sorted(DeepCacheConfig(interval=3, schedule="nonuniform", center=0.5).full_steps(50))
    assert steps[0] == 0 and steps[-1] == 49 and 14 <= len(steps) <= 17   # about 50 / 3 full steps
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    middle = [g for a, g in zip(steps, gaps) if 15 <= a <= 33]
    ends = [g for a, g in zip(steps, gaps) if a < 8 or a > 40]
    assert max(middle) < min(ends)
    assert sorted(DeepCacheConfig(interval=3).full_steps(10)) == [0, 3, 6, 9]
