"""Saved flow-matching pipelines (FLUX, SD3) through sdinfer: loading, the call signature against
diffusers' own pipelines, generation from Python and the CLI, a cache on them."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdinfer
from sdinfer.models.calling import call_denoiser, pack_latents, unpack_latents
from sdinfer.models.text_encoding import encode_prompts
from sdinfer.pipeline import Pipeline
from tiny_pipelines import build_tiny_flux, build_tiny_sd3, save_tiny_flux, save_tiny_sd3

PROMPT = "a red circle"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


def test_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x, 2)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 2, 6, 8), x)


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd3"])
def test_saved_flow_pipelines_load_and_generate(fixture, request):
    pipe = Pipeline.from_pretrained(request.getfixturevalue(fixture))
    model = pipe.model
    assert model.schedule.is_flow and model.prediction_type == "flow"
    assert model.text_encoder_2 is not None
    out = pipe(["a red circle", "a blue square"], steps=3, guidance_scale=2.0, size=16)
    assert out.pixels.shape == (2, 3, 16, 16) and torch.isfinite(out.pixels).all()
    assert out.nfe == 3
    again = pipe(["a red circle", "a blue square"], steps=3, guidance_scale=2.0, size=16)
    assert torch.equal(out.pixels, again.pixels)


def test_flux_dynamic_shift_follows_the_image_size(tiny_flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = Pipeline.from_pretrained(tiny_flux).model
    cfg = model.scheduler_config
    for size in (16, 32):
        tokens = (size // model.spatial_factor) ** 2
        mu = calculate_shift(tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                             cfg["base_shift"], cfg["max_shift"])
        assert model.schedule_at(size).shift == pytest.approx(math.exp(mu), rel=1e-12)
    assert model.schedule_at(32).shift > model.schedule_at(16).shift


def test_flux_generation_equals_diffusers_flux_pipeline():
    """The FLUX call signature (packed latents, position ids, timestep in [0, 1], pooled CLIP and
    T5 states) and text recipe: our loop with diffusers' timesteps lands where FluxPipeline does."""
    pipe = build_tiny_flux().to(dtype=torch.float64)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latents = pipe(PROMPT, num_inference_steps=4, height=16, width=16, latents=pack_latents(x_T, 2),
                   output_type="latent", max_sequence_length=24).images
    theirs = unpack_latents(latents, 2, 8, 8)

    from sdinfer.models.loading import LoadedModel, _flow_schedule

    model = LoadedModel("flux", Path("."), pipe.transformer, _flow_schedule(dict(pipe.scheduler.config), Path("."), 16),
                        "flow", pipe.text_encoder, pipe.tokenizer, pipe.vae, dict(pipe.scheduler.config),
                        pipe.text_encoder_2, pipe.tokenizer_2, pipeline_class="FluxPipeline")
    cond = encode_prompts(model, [PROMPT])
    ours = sdinfer.sample(lambda x, t, text: call_denoiser(pipe.transformer, x, t, text), x_T.clone(),
                          schedule=model.schedule, sampler="euler", steps=4, cond=cond, prediction_type="flow",
                          timesteps=pipe.scheduler.timesteps.double().tolist())
    # diffusers keeps its sigmas in float32: agreement to their round-off, where a wrong timestep
    # scale, position id or packing order is off by O(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x_T).abs().max() > 0.1


def test_flux_embedded_guidance_is_passed():
    pipe = build_tiny_flux(guidance_embeds=True)
    net = pipe.transformer
    x = torch.randn(1, 4, 8, 8)
    text = sdinfer.models.calling.TextConditioning(torch.randn(1, 5, 32), torch.randn(1, 16))
    out = call_denoiser(net, x, torch.tensor([500.0]), text)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sd3_text_recipe_matches_diffusers():
    pipe = build_tiny_sd3()
    from sdinfer.models.loading import LoadedModel

    model = LoadedModel("sd3", Path("."), pipe.transformer, None, "flow", pipe.text_encoder, pipe.tokenizer,
                        pipe.vae, {}, pipe.text_encoder_2, pipe.tokenizer_2, pipe.text_encoder_3, pipe.tokenizer_3,
                        pipeline_class="StableDiffusion3Pipeline")
    ours = encode_prompts(model, [PROMPT])
    states, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                              max_sequence_length=24)
    # the same to round-off (diffusers encodes with autograd on, which takes other kernels)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.states, states, rtol=1e-6, atol=1e-6)


def test_a_cache_runs_on_a_saved_flux_pipeline(tiny_flux):
    pipe = Pipeline.from_pretrained(tiny_flux)
    plain = pipe(PROMPT, steps=4, guidance_scale=1.0)
    handle = sdinfer.accelerate(pipe, "fora:interval=2")
    try:
        cached = pipe(PROMPT, steps=4, guidance_scale=1.0)
    finally:
        handle.remove()
    assert torch.isfinite(cached.pixels).all() and not torch.equal(plain.pixels, cached.pixels)
    assert torch.equal(pipe(PROMPT, steps=4, guidance_scale=1.0).pixels, plain.pixels)


@pytest.mark.slow   # starts a process
@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd3"])
def test_cli_generates_from_a_saved_flow_pipeline(fixture, request, tmp_path):
    out = tmp_path / "out.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "sdinfer", "generate", "a cat", "--model",
                          str(request.getfixturevalue(fixture)), "--steps", "2", "-o", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    assert Image.open(out).size == (16, 16)
