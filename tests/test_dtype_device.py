"""Devices and dtypes: bfloat16 end to end on the CPU (the shipped models, a cache per family, a
few samplers), the names ``--device`` / ``--dtype`` take, and the rank -> GPU / backend choice."""

from __future__ import annotations

import pytest
import torch

import sdinfer
from sdinfer.devices import (distributed_backend, draw_noise, rank_device, resolve_device,
                             resolve_dtype)
from sdinfer.errors import UserError
from sdinfer.eval.metrics import psnr
from sdinfer.pipeline import Pipeline

PROMPTS = ["a red circle in the top left"]
STEPS = 4
CACHE_STEPS = 6   # enough for every cache below to skip some work
# bfloat16 against float32, measured at 4 steps (cfg 4, this prompt): unet 44-46 dB over the
# samplers, dit 41.5 dB; the margins sit some dB below.
MIN_PSNR = {"unet": 40.0, "dit": 34.0}


@pytest.fixture(scope="module")
def bf16_pipes():
    return {name: Pipeline.from_pretrained(name, dtype="bfloat16") for name in ("unet", "dit")}


@pytest.fixture(scope="module")
def f32_pipes(unet_pipe, dit_pipe):
    return {"unet": unet_pipe, "dit": dit_pipe}


def _pair(f32_pipes, bf16_pipes, model, sampler="ddim", spec=None, steps=STEPS):
    out = []
    for pipe in (f32_pipes[model], bf16_pipes[model]):
        handle = sdinfer.accelerate(pipe, spec) if spec else None
        try:
            out.append(pipe(PROMPTS, steps=steps, sampler=sampler).pixels)
        finally:
            if handle is not None:
                handle.remove()
    return out


# ---- names --------------------------------------------------------------------------------------
def test_dtype_names():
    for text, dtype in (("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16),
                        ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), (None, torch.float32),
                        (torch.bfloat16, torch.bfloat16), ("torch.float16", torch.float16)):
        assert resolve_dtype(text) is dtype
    with pytest.raises(UserError, match=r"--dtype float8: unknown dtype .float8.; use float32, float16"):
        resolve_dtype("float8")
    with pytest.raises(UserError, match="float32, float16 or bfloat16"):
        resolve_dtype(torch.int8)


def test_device_names():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UserError, match="not a torch device name; use cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_names_the_fix():
    for name in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(UserError, match=r"--device cuda.*(no CUDA|no GPU).*torch .*use --device cpu"):
            resolve_device(name)
    with pytest.raises(UserError, match="use --device cpu"):
        Pipeline.from_pretrained("unet", device="cuda")


def test_mps_without_mps():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UserError, match="MPS .* not available.*use --device cpu"):
        resolve_device("mps")


def test_unknown_dtype_on_pipeline():
    with pytest.raises(UserError, match="--dtype int4: unknown dtype"):
        Pipeline.from_pretrained("unet", dtype="int4")


def test_float16_on_cpu_warns():
    with pytest.warns(UserWarning, match="float16 on the CPU is slow"):
        pipe = Pipeline.from_pretrained("unet", dtype="fp16")
    assert pipe.model.dtype == torch.float16 and pipe.model.text_encoder.dtype == torch.float16


# ---- ranks --------------------------------------------------------------------------------------
def test_rank_devices_and_backend():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert rank_device(cpu, 3) == cpu
    assert rank_device(cuda, 1, gpus=2) == torch.device("cuda", 1)
    assert rank_device(cuda, 1, gpus=1) == torch.device("cuda", 0)      # two ranks share the one GPU
    assert rank_device(torch.device("cuda", 1), 0, gpus=4) == torch.device("cuda", 1)
    assert distributed_backend(cpu, 4) == "gloo"
    assert distributed_backend(cuda, 2, gpus=2) == "nccl"
    assert distributed_backend(cuda, 1, gpus=1) == "nccl"
    assert distributed_backend(cuda, 2, gpus=1) == "gloo"                 # NCCL takes one rank per GPU
    assert distributed_backend(torch.device("cuda", 0), 2, gpus=8) == "gloo"


def test_launch_backend_follows_device(monkeypatch):
    from sdinfer.parallel import launch

    info = launch.RankInfo(rank=0, world_size=2, local_rank=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launch.default_backend("cpu", info) == "gloo"
    assert launch.default_backend(None, info) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    expected = "nccl" if torch.distributed.is_nccl_available() else "gloo"
    assert launch.default_backend("cuda", info) == expected
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert launch.default_backend("cuda", info) == "gloo"


# ---- numbers ------------------------------------------------------------------------------------
def test_noise_does_not_depend_on_the_sample_dtype():
    like32, like16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    a = draw_noise((3, 4), torch.Generator().manual_seed(5), like32)
    b = draw_noise((3, 4), torch.Generator().manual_seed(5), like16)
    assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
    assert torch.equal(a, torch.randn((3, 4), generator=torch.Generator().manual_seed(5)))


def test_sample_with_a_bfloat16_model_keeps_float32_arithmetic():
    """``sdinfer.sample`` on a bfloat16 x_T: the model sees bfloat16 samples and float32 timesteps
    (999 would round to 1000), the result comes back in bfloat16, close to float32's."""
    from sdinfer.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_diffusers_config({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                    "beta_start": 0.00085, "beta_end": 0.012})
    seen = []

    def model(x, t):
        seen.append((x.dtype, t.dtype, float(t.max())))
        return 0.3 * x   # the epsilon of a data distribution shrunk toward zero

    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    ref = sdinfer.sample(model, x_T, schedule, sampler="dpm-solver++", steps=8)
    seen.clear()
    out = sdinfer.sample(model, x_T.bfloat16(), schedule, sampler="dpm-solver++", steps=8)
    assert out.dtype == torch.bfloat16
    assert all(dx == torch.bfloat16 and dt == torch.float32 for dx, dt, _ in seen)
    assert seen[0][2] == 999.0
    assert (out.float() - ref).abs().max() < 0.01 * ref.abs().max()   # bfloat16 keeps 8 bits


def test_pipeline_keeps_the_sampler_in_float32(bf16_pipes):
    pipe = bf16_pipes["unet"]
    x = pipe.noise([0, 1], pipe.check_size(None))
    assert x.dtype == torch.float32
    seen = []
    handle = pipe.model.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        result = pipe(PROMPTS[:1], steps=2)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert result.pixels.dtype == torch.float32 and result.pixels.device.type == "cpu"


# ---- end to end in bfloat16 ---------------------------------------------------------------------
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_bfloat16_end_to_end(f32_pipes, bf16_pipes, model):
    assert bf16_pipes[model].model.dtype == torch.bfloat16
    ref, out = _pair(f32_pipes, bf16_pipes, model)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert psnr(out, ref) > MIN_PSNR[model]


@pytest.mark.parametrize("sampler", ["dpm-solver++", "dpm-solver-v3", "unipc", "ddim:eta=1"])
def test_bfloat16_samplers(f32_pipes, bf16_pipes, sampler):
    ref, out = _pair(f32_pipes, bf16_pipes, "unet", sampler=sampler)
    assert torch.isfinite(out).all()
    assert psnr(out, ref) > MIN_PSNR["unet"]


@pytest.fixture(scope="module")
def uncached_bf16(bf16_pipes):
    return {m: pipe(PROMPTS, steps=CACHE_STEPS).pixels for m, pipe in bf16_pipes.items()}


@pytest.mark.parametrize("model,spec", [("unet", "deepcache:interval=2"), ("unet", "teacache:threshold=0.3"),
                                        ("dit", "fora:interval=2"), ("dit", "teacache:threshold=0.3"),
                                        ("dit", "fbcache:threshold=0.3"), ("dit", "magcache:threshold=0.3")])
def test_bfloat16_caches(f32_pipes, bf16_pipes, uncached_bf16, model, spec):
    """The cache acts in bfloat16 (its image moves away from the uncached one: measured 19-36 dB)
    and lands close to the same cache in float32 (measured unet 47, dit 39-41 dB)."""
    ref, out = _pair(f32_pipes, bf16_pipes, model, spec=spec, steps=CACHE_STEPS)
    assert torch.isfinite(out).all()
    assert psnr(out, uncached_bf16[model]) < 38.0
    assert psnr(out, ref) > MIN_PSNR[model] - 4.0


def test_bfloat16_with_a_vae(tiny_sd):
    """A latent pipeline: text encoder, denoiser and VAE in bfloat16, the image float32."""
    f32 = Pipeline.from_pretrained(tiny_sd)
    bf16 = Pipeline.from_pretrained(tiny_sd, dtype=torch.bfloat16)
    assert bf16.model.vae.dtype == torch.bfloat16
    ref, out = (p(PROMPTS[:1], steps=3, size=32).pixels for p in (f32, bf16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert psnr(out, ref) > 30.0


@pytest.mark.slow
def test_bfloat16_under_exact_strategies(tmp_path):
    """CFG parallel and Ulysses on 2 ranks in bfloat16 (gloo carries bfloat16 tensors): the image
    of one device, up to bfloat16's batch-size-dependent rounding (measured 43.6 dB for cfg on the
    DiT, identical otherwise)."""
    from pathlib import Path

    from parallel_helpers import run_workers

    found = run_workers(Path(__file__).parent / "parallel_worker_dtype.py", None, tmp_path / "found.json")
    assert found.pop("backend") == "gloo"
    for case, got in found.items():
        assert got["dtype"] == "torch.float32", case
        assert got["psnr"] > 38.0, (case, got)
