"""sdinfer: faster diffusion inference, measured."""

__version__ = "0.1.0"

from .accelerate import accelerate  # noqa: E402
from .context import StepContext, current_step  # noqa: E402
from .denoiser import Denoiser  # noqa: E402
from .errors import UserError  # noqa: E402
from .sampling import sample  # noqa: E402
from .schedules import FlowMatchSchedule, NoiseSchedule  # noqa: E402

__all__ = ["Denoiser", "accelerate", "FlowMatchSchedule", "NoiseSchedule", "StepContext", "UserError",
           "current_step", "sample", "__version__"]
