"""Our samplers as diffusers scheduler objects, and diffusers' schedulers in our loop.

``SdinferScheduler`` is a diffusers ``SchedulerMixin`` / ``ConfigMixin`` that runs any
sdinfer sampler of one model evaluation per step (all but Heun and PLMS) inside a stock
diffusers pipeline:
``set_timesteps`` lays out our grid, ``step`` hands the pipeline's (guided) model
output to the sampler as that step's evaluation, ``scale_model_input`` is the
identity (our samplers work on x_t itself), ``add_noise`` is alpha_t x0 + sigma_t eps,
and the config round-trips through ``save_config`` / ``from_config``:

    pipe.scheduler = SdinferScheduler.from_config(pipe.scheduler.config, sampler="dpm-solver++-3m")

``DiffusersSampler`` is the other way round: any diffusers scheduler as an sdinfer
sampler, so that ``sdinfer.sample(..., sampler=DiffusersSampler(scheduler))`` compares
both on the same model, noise and settings.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from ..denoiser import Denoiser
from ..schedules import NoiseSchedule
from .base import BoundModel, SamplerState, StepSampler, continuous_grid, steps_one_by_one

# samplers that evaluate the model twice in a step (Heun always, PLMS in its first step), which
# a pipeline's one call per timestep cannot feed; diffusers' HeunDiscreteScheduler and
# PNDMScheduler are their counterparts there
SEVERAL_EVALUATIONS_PER_STEP = {"heun": "HeunDiscreteScheduler", "plms": "PNDMScheduler"}


class _PipelineOutput:
    """The model output a pipeline hands to ``step``, served as the sampler's one evaluation."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.expected: torch.Tensor | None = None

    def __call__(self, x, model_t, text):
        if self.pending is None:
            raise RuntimeError("this sampler evaluates the model more than once per step, which a "
                               "diffusers pipeline cannot do; run it through sdinfer.sample")
        out, self.pending = self.pending, None
        return out


class _RecordingDenoiser(Denoiser):
    """Keeps the data prediction of its last evaluation (diffusers' pred_original_sample)."""

    last_x0 = None

    def __call__(self, x, t, cond, uncond, ctx, evaluations: int = 1):
        pred = super().__call__(x, t, cond, uncond, ctx, evaluations)
        self.last_x0 = pred.x0
        return pred


class SdinferScheduler(SchedulerMixin, ConfigMixin):
    """An sdinfer sampler behind diffusers' scheduler interface (VP schedules)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, sampler: str = "dpm-solver++", num_train_timesteps: int = 1000,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str | None = None, final: str = "zero"):
        from . import get_sampler

        self.solver = get_sampler(sampler)
        if not steps_one_by_one(self.solver):
            raise ValueError(f"sampler {self.solver.name!r} runs its own loop over the steps, which a "
                             "diffusers pipeline's loop cannot drive; use it through sdinfer.sample "
                             "or sdinfer's Pipeline")
        if self.solver.name in SEVERAL_EVALUATIONS_PER_STEP:
            raise ValueError(f"sampler {self.solver.name!r} evaluates the model twice in a step, "
                             "which a pipeline's one call per timestep cannot feed; use it through "
                             "sdinfer.sample, or diffusers' own "
                             f"{SEVERAL_EVALUATIONS_PER_STEP[self.solver.name]}")
        self.schedule = NoiseSchedule.from_diffusers_config(dict(self.config))
        self._output = _PipelineOutput()
        self.denoiser = _RecordingDenoiser(self._output, self.schedule, prediction_type)
        self._model = BoundModel(self.denoiser)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.empty(0)
        self._times: list[float] = []
        self._state = SamplerState()
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, device=None, **_):
        spacing = self.config.timestep_spacing or getattr(self.solver, "spacing", "trailing")
        self._times = continuous_grid(self.denoiser, num_inference_steps, spacing,
                                      final=self.config.final)
        model_t = self.schedule.model_time(torch.tensor(self._times[:-1], dtype=torch.float64))
        self.timesteps = model_t.to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._state, self._step_index = SamplerState(), 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, **_):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"step called {i + 1} times for {self.num_inference_steps} steps; "
                             "call set_timesteps again for a new generation")
        t, t_next = self._times[i], self._times[i + 1]
        state, n = self._state, self.num_inference_steps
        state.step_index, state.num_steps, state.generator = i, n, generator
        self._output.pending = model_output.to(sample.dtype)
        with self._model.at_step(i, n, t, t_next):
            prev = self.solver.step(self._model, sample, t, t_next, state)
        self._output.pending = None
        self._step_index += 1
        x0 = self.denoiser.last_x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict \
            else (prev, x0)

    def add_noise(self, original_samples, noise, timesteps):
        t = self.schedule.continuous_time(timesteps.to(torch.float64).cpu())
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = self.schedule.alpha(t).to(original_samples).view(shape)
        s = self.schedule.sigma(t).to(original_samples).view(shape)
        return a * original_samples + s * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


@dataclass
class DiffusersSampler(StepSampler):
    """A diffusers scheduler driven by our loop.  It keeps its own timesteps, state and
    latent (sigma-scaled for the Karras-style schedulers; x_t for the others)."""

    scheduler: object
    name: str = "diffusers"
    min_steps: int = 1
    resumable = False   # the scheduler sets its timesteps and latent at step 0 (``sample_loop(start=)``)

    def step(self, model, x, t, t_next, state):
        sched = self.scheduler
        i, n = state.step_index, state.num_steps
        if i == 0:
            sched.set_timesteps(n)
            if len(sched.timesteps) != n:
                raise ValueError(f"{type(sched).__name__} makes {len(sched.timesteps)} model calls "
                                 f"for {n} steps; only one call per step runs here")
            state["latent"] = x * sched.init_noise_sigma
        model_t = sched.timesteps[i]
        t_model = float(model.schedule.continuous_time(model_t.double()))
        out = model.raw(sched.scale_model_input(state["latent"], model_t), t_model)
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        extra = {"generator": state.generator} if takes_generator else {}
        state["latent"] = sched.step(out, model_t, state["latent"], **extra).prev_sample
        if i + 1 < n:
            return sched.scale_model_input(state["latent"], sched.timesteps[i + 1])
        return state["latent"]
