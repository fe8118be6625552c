"""Our samplers inside stock diffusers pipelines, and diffusers' schedulers in our loop."""

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)

import sdinfer
from sdinfer.samplers.diffusers_scheduler import SdinferScheduler
from sdinfer.schedules import NoiseSchedule
from test_ddim import model_fn
from tiny_pipelines import build_tiny_pixart, build_tiny_sd

PROMPT = "a red circle"


# float64 throughout: the pipeline batches the guidance branches in another order than
# sdinfer.sample, which in float32 changes the rounding (by up to 2e-4 relative, depending on the CPU)
@pytest.fixture(scope="module")
def sd_pipe():
    return build_tiny_sd().to(dtype=torch.float64)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "dpm-solver++-3m", "unipc",
                                     "dpm-solver++-singlestep:order=3", "euler", "ddpm"])
def test_our_scheduler_in_a_stable_diffusion_pipeline_equals_sdinfer_sample(sd_pipe, sampler):
    pipe = sd_pipe
    pipe.scheduler = SdinferScheduler.from_config(pipe.scheduler.config, sampler=sampler)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latents = pipe(PROMPT, num_inference_steps=9, guidance_scale=3.0, latents=x_T.clone(),
                   output_type="latent", generator=torch.Generator().manual_seed(5)).images
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)

    def unet(x, t, text):
        return pipe.unet(x, t, encoder_hidden_states=text).sample

    ours = sdinfer.sample(unet, x_T.clone(), schedule=pipe.scheduler, sampler=sampler, steps=9,
                          cond=cond, uncond=uncond, guidance_scale=3.0,
                          prediction_type=pipe.scheduler.config.prediction_type,
                          generator=torch.Generator().manual_seed(5))  # ddpm's noise
    torch.testing.assert_close(latents, ours, rtol=1e-10, atol=1e-10)


def test_our_scheduler_in_a_pixart_pipeline_equals_sdinfer_sample():
    pipe = build_tiny_pixart().to(dtype=torch.float64)
    pipe.scheduler = SdinferScheduler.from_config(pipe.scheduler.config, sampler="dpm-solver++")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latents = pipe(PROMPT, num_inference_steps=6, guidance_scale=2.0, latents=x_T.clone(),
                   output_type="latent", use_resolution_binning=False).images
    cond, mask_c, uncond, mask_u = pipe.encode_prompt(PROMPT, True, device="cpu")

    def transformer(x, t, text):
        mask = torch.cat([mask_c, mask_u]) if x.shape[0] == 2 else mask_c
        out = pipe.transformer(x, encoder_hidden_states=text, encoder_attention_mask=mask,
                               timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.chunk(2, dim=1)[0]  # learned variance: the mean prediction

    ours = sdinfer.sample(transformer, x_T.clone(), schedule=pipe.scheduler, sampler="dpm-solver++",
                          steps=6, cond=cond, uncond=uncond, guidance_scale=2.0,
                          prediction_type=pipe.scheduler.config.prediction_type)
    torch.testing.assert_close(latents, ours, rtol=1e-10, atol=1e-10)


def test_config_round_trip(tmp_path):
    sched = SdinferScheduler(sampler="dpm-solver++:order=3", beta_schedule="scaled_linear",
                             beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    sched.save_config(tmp_path)
    again = SdinferScheduler.from_pretrained(tmp_path)
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(again.config) == public(sched.config)
    sched.set_timesteps(7), again.set_timesteps(7)
    torch.testing.assert_close(sched.timesteps, again.timesteps)


def test_add_noise_matches_diffusers():
    ours = SdinferScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t),
                               rtol=1e-5, atol=1e-5)
    assert ours.scale_model_input(x0, 10) is x0


@pytest.mark.parametrize("sampler", ["heun", "plms"])
def test_a_two_evaluation_sampler_is_refused_with_a_reason(sampler):
    with pytest.raises(ValueError, match="twice in a step"):
        SdinferScheduler(sampler=sampler)


def test_step_before_set_timesteps_is_an_error():
    sched = SdinferScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))


def _run_diffusers_loop(sched, x, steps):
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(x.shape[0]).double())
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(beta_schedule="linear"),
    lambda: DPMSolverMultistepScheduler(beta_schedule="linear"),
    lambda: UniPCMultistepScheduler(beta_schedule="linear"),
    lambda: EulerDiscreteScheduler(beta_schedule="linear"),
])
def test_diffusers_schedulers_run_through_sdinfer_sample(make):
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _run_diffusers_loop(make(), x_T.clone(), 10)
    sched = make()
    ours = sdinfer.sample(lambda x, t: model_fn(x, t), x_T.clone(),
                          schedule=NoiseSchedule.from_diffusers_config(sched.config), sampler=sched,
                          steps=10)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-5)


def test_diffusers_ddim_through_sdinfer_equals_our_ddim():
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sched = DDIMScheduler(beta_schedule="linear", timestep_spacing="trailing", clip_sample=False)
    schedule = NoiseSchedule.from_diffusers_config(sched.config)
    theirs = sdinfer.sample(lambda x, t: model_fn(x, t), x_T.clone(), schedule, sampler=sched, steps=10)
    ours = sdinfer.sample(lambda x, t: model_fn(x, t), x_T.clone(), schedule, sampler="ddim", steps=10)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
