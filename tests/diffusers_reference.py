"""Running a diffusers scheduler in float64 as the reference for our samplers."""

import numpy as np
import torch

from test_ddim import model_fn


def run_float64(sched, x: torch.Tensor, steps: int, final: str = "zero") -> torch.Tensor:
    """Sample with a sigma-based diffusers multistep scheduler, its sigmas recomputed in
    float64 (diffusers keeps them in float32)."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod.numpy()
    sig = np.sqrt((1 - ac) / ac)
    last = 0.0 if final == "zero" else sig[0]
    sched.sigmas = torch.tensor(np.concatenate([sig[sched.timesteps.numpy()], [last]]),
                                dtype=torch.float64)
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.double().expand(x.shape[0])), t, x).prev_sample
    return x
