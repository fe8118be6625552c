"""The quantization layer: formats, packing, the quantized layer's error bound, the folder, the
entry point on sdinfer's and stock diffusers pipelines, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sdinfer.errors import UserError
from sdinfer.quant import CalibrationConfig, quantize
from sdinfer.quant.formats import fp_candidates, fp_format, int_format, named_format
from sdinfer.quant.layers import ActivationQuantizer, QuantizedLayer
from sdinfer.quant.packing import pack, packed_bytes, unpack
from sdinfer.quant.scalar import affine_params, codes_of, max_scale, search_affine

TINY_CALIBRATION = CalibrationConfig(prompts=2, steps=3)
PROMPTS = ["a red circle in the top left", "a blue square in the bottom right"]


def test_fp4_e2m1_is_the_ocp_table_and_fp8_e4m3_reaches_448():
    mags = sorted(set(abs(v) for v in fp_format(2, 1).values.tolist()))
    assert mags == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert fp_format(4, 3).max == 480.0   # every code finite: the E4M3 top binade holds 256 .. 480
    assert [f.name for f in fp_candidates("fp4")] == ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
    assert int_format(4).values.tolist() == list(range(-8, 8))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 12])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (1001,), generator=gen)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(1001, bits)
    assert torch.equal(unpack(packed, bits, 1001), codes)


def test_unpack_refuses_too_few_bytes():
    with pytest.raises(UserError, match="damaged"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 100)


@pytest.mark.parametrize("fmt_name", ["int4", "int8", "fp4_e2m1", "fp8_e4m3", "fp6_e3m2"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_quantized_layer_within_its_formats_error_bound(fmt_name, layer):
    torch.manual_seed(0)
    module = torch.nn.Linear(24, 16) if layer == "linear" else torch.nn.Conv2d(6, 8, 3, padding=1)
    fmt = named_format(fmt_name)
    scale = max_scale(module.weight, fmt)
    q = QuantizedLayer.from_codes(module, codes_of(module.weight, fmt, scale), fmt.values, scale, fmt.name)
    w = module.weight.detach()
    w_rows = w.reshape(w.shape[0], -1)
    bound = (fmt.step_bound(w_rows / scale[:, None]) * scale[:, None]).reshape(w.shape)
    error = (q.dequantized_weight() - w).abs()
    assert (error <= bound + 1e-7).all()
    assert error.max() > 0                      # it did quantize
    x = torch.randn(5, 24) if layer == "linear" else torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        y, y_q = module(x), q(x)
        # |W x - W_q x| <= |W - W_q| |x| elementwise, summed over the inputs each output reads
        if layer == "linear":
            out_bound = x.abs() @ bound.t()
        else:
            out_bound = torch.nn.functional.conv2d(x.abs(), bound, padding=1)
    assert ((y - y_q).abs() <= out_bound + 1e-5).all()


def test_affine_quantization_keeps_zero_and_uses_every_level_of_a_skewed_range():
    fmt = int_format(4)
    torch.manual_seed(0)
    module = torch.nn.Linear(32, 8)
    with torch.no_grad():
        module.weight.copy_(torch.rand(8, 32) * 3 - 0.2)         # nearly all positive rows
    scale, offset = search_affine(module.weight, fmt)
    assert torch.equal(offset / scale, torch.round(offset / scale))   # zero is a table value
    codes = fmt.nearest((module.weight.detach() - offset[:, None]) / scale[:, None])
    affine = QuantizedLayer.from_codes(module, codes, fmt.values, scale, fmt.name, offset=offset)
    assert affine.layout()["offset"] and affine.storage_bits() == 8 * 32 * 4 + (16 + 2 * 8) * 16
    sym = max_scale(module.weight, fmt)
    symmetric = QuantizedLayer.from_codes(module, codes_of(module.weight, fmt, sym), fmt.values, sym, fmt.name)
    w = module.weight.detach()
    err = (affine.dequantized_weight() - w).pow(2).mean()
    assert err < 0.5 * (symmetric.dequantized_weight() - w).pow(2).mean()
    assert len(codes.unique()) > len(codes_of(module.weight, fmt, sym).unique())
    x = torch.rand(4, 10) * 5 - 0.1                                # an input after a GELU
    s, o = affine_params(x.min(), x.max(), named_format("int8"))
    act = ActivationQuantizer(named_format("int8"), s, offsets=o)
    assert (act(x) - x).abs().max() <= s / 2 + 1e-6 and float(act(torch.zeros(1))) == 0.0


def test_quantize_and_remove_on_the_default_unet(unet_pipe):
    reference = unet_pipe(PROMPTS, steps=3, seed=1).pixels
    handle = quantize(unet_pipe, "rtn:weights=int4")
    try:
        assert len(handle.layers) > 100 and 4.0 < handle.bits_per_weight() < 4.5
        quantized = unet_pipe(PROMPTS, steps=3, seed=1).pixels
        assert not torch.equal(quantized, reference) and torch.isfinite(quantized).all()
        with pytest.raises(UserError, match="already quantized"):
            quantize(unet_pipe, "rtn:weights=int8")
    finally:
        handle.remove()
    assert torch.equal(unet_pipe(PROMPTS, steps=3, seed=1).pixels, reference)


def test_the_temporal_path_is_declared_for_both_default_models(unet_pipe):
    from sdinfer.pipeline import Pipeline
    from sdinfer.quant import targets_of, temporal_names

    unet_temporal = temporal_names(unet_pipe.model.denoiser)
    assert "time_embedding.linear_1" in unet_temporal and "down_blocks.0.resnets.0.time_emb_proj" in unet_temporal
    dit = Pipeline.from_pretrained("dit").model.denoiser
    assert {"transformer_blocks.0.norm1.linear", "time_text_embed.timestep_embedder.linear_1"} <= temporal_names(dit)
    targets = targets_of(dit)
    assert "pos_embed.proj" not in targets and "proj_out" not in targets      # input / output stay float
    assert "transformer_blocks.3.ff.net.2" in targets


def test_learned_rounding_beats_nearest_on_the_layer_output():
    from sdinfer.quant.rounding import learn_rounding

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    mixing = torch.randn(32, 32)     # correlated inputs, as a layer's activations are
    inputs = [torch.randn(64, 32) @ mixing for _ in range(4)]
    fmt = named_format("fp4_e2m1")
    scale = max_scale(layer.weight, fmt)
    w = layer.weight.detach()

    def output_error(codes):
        w_q = fmt.values[codes].reshape(w.shape) * scale[:, None]
        return sum(float(((x @ w_q.t()) - (x @ w.t())).pow(2).sum()) for x in inputs)

    learned = learn_rounding(w, fmt, scale, inputs, "linear", iters=300)
    nearest = codes_of(w, fmt, scale).reshape(-1)
    assert output_error(learned.reshape(-1)) < 0.9 * output_error(nearest)


def test_lbq_searches_the_fp4_split_per_layer_and_quantizes_activations(unet_pipe):
    handle = quantize(unet_pipe, "lbq:weights=fp4,activations=fp8,iters=5", TINY_CALIBRATION)
    try:
        formats = {layer.format_name for layer in handle.layers.values()}
        assert formats <= {"fp4_e2m1", "fp4_e1m2", "fp4_e3m0"} and formats
        assert all(layer.act is not None and layer.act.format_name.startswith("fp8") for layer in handle.layers.values())
        assert handle.calibration["trajectories"]["model_calls"] == TINY_CALIBRATION.steps
        assert torch.isfinite(unet_pipe(PROMPTS[:1], steps=2, seed=0).pixels).all()
    finally:
        handle.remove()


def test_a_quantized_folder_loads_and_generates_what_was_quantized(unet_pipe, tmp_path):
    from sdinfer.pipeline import Pipeline

    handle = quantize(unet_pipe, "rtn:weights=int4,activations=int8", TINY_CALIBRATION)
    try:
        in_memory = unet_pipe(PROMPTS, steps=3, seed=2).pixels
        out = handle.save(tmp_path / "q", source=unet_pipe.model.path)
    finally:
        handle.remove()
    weights = list((out / "unet").iterdir())
    assert sorted(p.name for p in weights) == ["config.json", "sdinfer_quantized.safetensors"]
    loaded = Pipeline.from_pretrained(str(out))
    assert torch.equal(loaded(PROMPTS, steps=3, seed=2).pixels, in_memory)
    info = loaded.model.denoiser.sdinfer_quantization
    assert info.method == "rtn" and info.settings["weights"] == "int4"
    with pytest.raises(UserError, match="no full-precision layers"):
        info.remove()
    with pytest.raises(UserError, match="not empty"):
        handle.save(tmp_path / "q", source=unet_pipe.model.path)


def _saved(unet_pipe, folder):
    handle = quantize(unet_pipe, "rtn:weights=int8")
    try:
        return handle.save(folder, source=unet_pipe.model.path)
    finally:
        handle.remove()


def test_a_corrupt_quantized_file_is_one_clear_error(unet_pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    from sdinfer.models.loading import load_model

    folder = _saved(unet_pipe, tmp_path / "q")
    file = folder / "unet" / "sdinfer_quantized.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_model(folder)
    folder = _saved(unet_pipe, tmp_path / "q2")
    file = folder / "unet" / "sdinfer_quantized.safetensors"
    tensors = load_file(str(file))
    save_file(tensors, str(file), metadata={"format": "something-else"})
    with pytest.raises(UserError, match="not an sdinfer quantized model"):
        load_model(folder)
    folder = _saved(unet_pipe, tmp_path / "q3")
    file = folder / "unet" / "sdinfer_quantized.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.endswith(".packed"))
    tensors[name] = tensors[name][:3].clone()
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(UserError, match="damaged"):
        load_model(folder)


def test_bad_specs_are_one_clear_error(unet_pipe):
    for spec, message in (("lbq:weights=fp5", "unknown floating-point format"),
                          ("lbq:weights=int4", "unknown floating-point format"),
                          ("rtn:weights=int9", "unknown number format"),
                          ("lbq:rounding=up", "rounding"),
                          ("awq", "unknown quantization method"),
                          ("rtn:bits=4", "has no option")):
        with pytest.raises(UserError, match=message):
            quantize(unet_pipe, spec)


def test_a_model_with_no_adapter_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UserError, match="no adapter for Sequential"):
        quantize(model, "rtn:weights=int8")


def test_calibration_needs_a_pipeline_for_data_methods(unet_pipe):
    with pytest.raises(UserError, match="cannot calibrate on a bare"):
        quantize(unet_pipe.model.denoiser, "rtn:weights=int4,activations=int8")


@pytest.mark.parametrize("build", ["build_tiny_sd", "build_tiny_pixart", "build_tiny_flux"])
def test_stock_diffusers_pipelines_quantize_and_run(build):
    import tiny_pipelines

    pipe = getattr(tiny_pipelines, build)()
    extra = {"use_resolution_binning": False} if build == "build_tiny_pixart" else {}
    kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="latent", **extra)
    if build != "build_tiny_flux":
        kwargs["guidance_scale"] = 4.0
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    handle = quantize(pipe, "rtn:weights=int4,activations=int8", CalibrationConfig(prompts=1, steps=2),
                      prompts=["a red circle"], pipeline_kwargs=extra)
    try:
        assert len(handle.layers) > 0
        quantized = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(quantized).all() and not torch.equal(quantized, reference)
    finally:
        handle.remove()
    assert torch.equal(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, reference)


@pytest.mark.slow
def test_cli_quantize_writes_a_folder_generate_loads(tmp_path):
    out = tmp_path / "unet-int8"
    run = subprocess.run([sys.executable, "-m", "sdinfer", "quantize", "--model", "unet", "--method", "rtn:weights=int8",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout[: run.stdout.rindex("}") + 1])
    assert summary["method"] == "rtn" and 8.0 < summary["bits_per_weight"] < 9.0
    image = tmp_path / "x.png"
    run = subprocess.run([sys.executable, "-m", "sdinfer", "generate", "a red circle in the top left", "--model",
                          str(out), "--steps", "2", "-o", str(image)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and image.is_file(), run.stderr
    run = subprocess.run([sys.executable, "-m", "sdinfer", "quantize", "--model", "unet", "--method", "rtn:weights=int8",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"sdinfer: error: --out {out} exists and is not empty; give a new folder (or --overwrite to replace it)"]


def _png(path):
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.slow
def test_a_quantized_folder_runs_under_parallel_strategies_and_caches(unet_pipe, tmp_path):
    """Weight-only, so that the exact strategies are exact: quantized activations round, and a
    different batch composition (cfg's halves) can flip a rounding (max abs 0.14 in one call)."""
    from sdinfer.eval.metrics import psnr

    handle = quantize(unet_pipe, "rtn:weights=int4", TINY_CALIBRATION)
    try:
        folder = handle.save(tmp_path / "q", source=unet_pipe.model.path)
    finally:
        handle.remove()
    common = ["a red circle in the top left", "--model", str(folder), "--steps", "4", "--seed", "3"]

    def generate(name, *extra):
        out = tmp_path / f"{name}.png"
        run = subprocess.run([sys.executable, "-m", "sdinfer", "generate", *common, *extra, "-o", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return _png(out)

    one = generate("one", "--accelerate", "deepcache:interval=2")
    cfg = generate("cfg", "--accelerate", "deepcache:interval=2", "--parallel", "cfg", "--world-size", "2")
    assert psnr(cfg, one) > 40                      # exact strategy, exact cache: one device's image
    plain = generate("plain")
    # DistriFusion with every step a warm-up step is exact too: its halo convs run the quantized convs
    patches = generate("distrifusion", "--parallel", "distrifusion:warmup_steps=4", "--world-size", "2")
    assert psnr(patches, plain) > 40


@pytest.mark.parametrize("kernel", ["torchao-int8-dynamic", "torchao-int8-weight", "torch-dynamic-int8"])
def test_kernel_baselines_quantize_the_target_linears_and_restore(unet_pipe, kernel):
    from sdinfer.eval.metrics import psnr
    from sdinfer.quant.kernels import apply_kernel, linear_targets

    reference = unet_pipe(PROMPTS, steps=2, seed=4).pixels
    linears = linear_targets(unet_pipe.model.denoiser)
    restore = apply_kernel(unet_pipe.model.denoiser, kernel)
    try:
        now = {name: unet_pipe.model.denoiser.get_submodule(name) for name in linears}
        swapped = [name for name, m in now.items()
                   if type(m) is not torch.nn.Linear or type(m.weight) is not torch.nn.Parameter]
        assert len(swapped) == len(linears)
        quantized = unet_pipe(PROMPTS, steps=2, seed=4).pixels
        assert 25 < psnr(quantized, reference) < 90
    finally:
        restore()
    assert torch.equal(unet_pipe(PROMPTS, steps=2, seed=4).pixels, reference)


def test_an_unknown_kernel_baseline_is_refused(unet_pipe):
    from sdinfer.quant.kernels import apply_kernel

    with pytest.raises(UserError, match="unknown kernel baseline"):
        apply_kernel(unet_pipe.model.denoiser, "int3-magic")
