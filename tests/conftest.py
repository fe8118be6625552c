import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    from sdinfer.cli import _quiet_libraries

    _quiet_libraries()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from tiny_pipelines import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    from tiny_pipelines import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("tiny") / "pixart")


@pytest.fixture(scope="session")
def unet_pipe():
    """The default UNet's pipeline, shared: a test that installs an accelerator removes it."""
    from sdinfer.pipeline import Pipeline

    return Pipeline.from_pretrained("unet")


@pytest.fixture(scope="session")
def dit_pipe():
    from sdinfer.pipeline import Pipeline

    return Pipeline.from_pretrained("dit")


@pytest.fixture(scope="session")
def default_pipe():
    from sdinfer.pipeline import Pipeline

    return Pipeline.from_pretrained("default")


def lambda_grid(sched, steps):
    """Model timesteps uniform in lambda from t = 1 to t_min; the loop then ends at t_min."""
    lam = torch.linspace(float(sched.lam(1.0)), float(sched.lam(sched.t_min)), steps + 1,
                         dtype=torch.float64)
    return [float(sched.model_time(sched.inverse_lambda(v))) for v in lam[:-1]]


@pytest.fixture(scope="module")
def gm_problem():
    """The Gaussian mixture's schedule, 64 noise samples and their exact solution at t_min."""
    from sdinfer.eval import gaussian_mixture as gm

    sched = gm.schedule()
    x_T = torch.randn(64, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sched, x_T, gm.reference_solution(sched, x_T, sched.t_min)
