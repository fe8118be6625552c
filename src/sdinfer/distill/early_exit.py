"""Early exiting by time (Moon, Choi, Kim, Park, Kim, Lee & Lee, "A Simple Early Exiting Framework
for Accelerated Sampling in Diffusion Models", ICML 2024: Adaptive Score Estimation, ASE).

Estimating the score is easier at some noise levels than at others, so the network's depth can
depend on the time: a schedule k(t) names how many of the network's *skippable units* a call at
time t leaves out, and the paper fine-tunes the pretrained model briefly so that the truncated
network still answers well at those t.  At inference the schedule is indexed by t and only the kept
units run:

    eps_theta'(x_t, t) = head( f_{u_1} o ... o f_{u_{N-k(t)}} (embed(x_t, t)) )

with the skipped units' output replaced by their input (their residual branch dropped).

Units, in the order they are skipped (``skip_units``):
  * transformers (SD3's MM-DiT, PixArt / DiT): the blocks from the last one backwards, the final
    layer (norm and projection) kept, as the paper drops a DiT's last blocks.  SD3's last block is
    ``context_pre_only`` (it returns no text stream); a skipped block returns its inputs in the
    block's own output order, so whichever block ends up last feeds the final layer as before.
  * UNets (which the paper treats through U-ViT, whose decoder blocks it drops while keeping their
    skip-fed linear layers): the residual units whose input and output shapes match and whose
    skip connections are not read by any other unit: the bottleneck (the mid block) first, then
    the attention blocks of the down and up levels, deepest level first and decoder before encoder.
    The UNet's convolutional resnets, which carry the skip concatenations, always run.

The schedule (``ExitSchedule``) is piecewise constant over s = t / 1000 in [0, 1] (the model's own
timestep divided by the 1000 training timesteps of DDPM and flow models alike) in equal-width
buckets, written ``K0/K1/.../Kn-1`` from s = 0 (clean) to s = 1 (noise).  ``sdinfer distill
early-exit`` derives it from measurement (``early_exit_train.skip_errors``: per bucket the error of
short generations' final images when only that bucket's calls skip k units; ``derive_schedule``
raises k where the error per unit of compute saved is least until the compute budget is met), or
takes it as given (``--schedule``), fine-tunes the whole
denoiser against the unmodified one, and writes the weights and the schedule to
``MODEL/sdinfer_calibration/early-exit.safetensors``.

``early-exit`` mounts like a cache: ``sdinfer.accelerate(pipe, "early-exit")`` swaps the
fine-tuned weights into the denoiser (``remove()`` puts the original tensors back, bit for bit) and
hooks every unit; each call reads t from the step context (sdinfer's loop, or the step tracker on a
stock diffusers pipeline).  ``schedule=`` overrides the trained schedule (``none`` skips nothing),
``weights=original`` keeps the model's own weights (the trained schedule, or ``schedule=``, without
the fine-tuning).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.hooks import ModelHook

from ..cache.base import CacheConfig, CacheHandle, hidden_states_of, hook_name, require_step
from ..errors import UserError
from ..models import artifacts
from ..models.adapters import adapter_for

METHOD = "early-exit"
TIMESTEP_SCALE = 1000.0   # s = model timestep / 1000: DDPM's train steps and flow models' sigma * 1000
MAKE = "sdinfer distill early-exit --model MODEL"
TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel")
UNET_CLASSES = ("UNet2DConditionModel",)


# ---- the schedule ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitSchedule:
    """k(s): how many skippable units a call at s = t / 1000 leaves out, constant on each of
    ``len(counts)`` equal-width buckets of [0, 1] (``counts[0]`` nearest the clean image)."""

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.counts or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.counts):
            raise ValueError(f"an exit schedule needs one whole number >= 0 per bucket, got {self.counts}")

    @classmethod
    def parse(cls, text: str) -> "ExitSchedule":
        """``"K0/K1/..."`` (or ``none``: nothing skipped) into a schedule, or a UserError."""
        text = text.strip()
        if text.lower() == "none":
            return cls((0,))
        if not re.fullmatch(r"\d+(/\d+)*", text):
            raise UserError(f"early-exit schedule {text!r} is not a list of skipped-unit counts per time bucket; "
                            "write it as K0/K1/.../Kn (equal buckets of t from clean to noise, e.g. 2/2/1/0), "
                            "or none")
        return cls(tuple(int(k) for k in text.split("/")))

    def text(self) -> str:
        return "/".join(str(k) for k in self.counts)

    def bucket(self, s: float) -> int:
        """The bucket of s (clamped into [0, 1]; s = 1 falls in the last bucket)."""
        s = min(max(float(s), 0.0), 1.0)
        return min(int(s * len(self.counts)), len(self.counts) - 1)

    def skipped(self, s: float) -> int:
        return self.counts[self.bucket(s)]

    def check(self, units: int) -> None:
        if max(self.counts) > units:
            raise UserError(f"early-exit schedule {self.text()} skips up to {max(self.counts)} units but this model "
                            f"has {units} skippable ones; give counts of at most {units}")

    def saved_fraction(self, costs: list[float]) -> float:
        """The mean fraction of the units' compute left out over s uniform in [0, 1]."""
        total = sum(costs)
        return sum(sum(costs[:k]) for k in self.counts) / (len(self.counts) * total) if total else 0.0


# ---- the units -----------------------------------------------------------------------------------
def _unet_level(name: str, levels: int) -> tuple[int, int]:
    """(depth, decoder first) of a UNet unit: down block i and up block levels-1-i share depth i."""
    part, index = name.split(".")[:2]
    depth = int(index) if part == "down_blocks" else levels - 1 - int(index)
    return depth, 0 if part == "up_blocks" else 1


def skip_units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the model's skippable units, in the order they are skipped."""
    name = type(model).__name__
    if name in TRANSFORMER_CLASSES:
        blocks = [(n, b) for n, b in adapter_for(model).blocks(model)]
        return blocks[::-1]
    if name in UNET_CLASSES:
        levels = len(model.down_blocks)
        attentions = [(n, m) for n, m in adapter_for(model).layer_blocks(model)
                      if ".attentions." in n and not n.startswith("mid_block")]
        attentions.sort(key=lambda item: (-_unet_level(item[0], levels)[0], _unet_level(item[0], levels)[1],
                                          -int(item[0].split(".")[-1])))
        mid = [("mid_block", model.mid_block)] if getattr(model, "mid_block", None) is not None else []
        return mid + attentions
    raise UserError(f"early-exit supports {', '.join(TRANSFORMER_CLASSES + UNET_CLASSES)}; "
                    f"{name} has no declared skippable units")


def passthrough(module: torch.nn.Module, args: tuple, kwargs: dict):
    """What a skipped unit returns: its input, in the form of the unit's own output."""
    hidden = hidden_states_of(args, kwargs)
    kind = type(module).__name__
    if kind == "JointTransformerBlock":
        encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        return (None if module.context_pre_only else encoder), hidden
    if kind in ("Transformer2DModel", "SD3Transformer2DModel"):   # a UNet's attention block
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return (hidden,) if kwargs.get("return_dict", True) is False else Transformer2DModelOutput(sample=hidden)
    return hidden   # mid blocks, BasicTransformerBlock


class ExitControl:
    """The decision shared by one model's unit hooks: how many units this call skips.  During
    training ``forced`` sets it; otherwise the step context's timestep indexes the schedule."""

    def __init__(self, schedule: ExitSchedule):
        self.schedule = schedule
        self.forced: int | None = None

    def skipped(self) -> int:
        if self.forced is not None:
            return self.forced
        ctx = require_step()
        return self.schedule.skipped(time_of(ctx.model_t))


def time_of(model_t: float) -> float:
    return float(model_t) / TIMESTEP_SCALE


class SkipHook(ModelHook):
    """A unit's hook: returns the unit's input where this call skips the unit's position."""

    def __init__(self, control: ExitControl, position: int):
        super().__init__()
        self.control, self.position = control, position

    def new_forward(self, module, *args, **kwargs):
        if self.position < self.control.skipped():
            return passthrough(module, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


def install_skips(model: torch.nn.Module, control: ExitControl, handle: CacheHandle) -> list[str]:
    units = skip_units(model)
    control.schedule.check(len(units))
    name = hook_name("early_exit")
    for position, (_, module) in enumerate(units):
        handle.register(module, SkipHook(control, position), name)
    return [n for n, _ in units]


# ---- the fine-tuned weights ----------------------------------------------------------------------
def weights_file(model: torch.nn.Module, given: str) -> Path:
    if given:
        return Path(given)
    folder = artifacts.model_folder(model)
    found = artifacts.find(folder, METHOD)
    if found is None:
        where = artifacts.path(folder, METHOD) if folder else "beside the model (it came from no folder)"
        raise artifacts.MissingArtifact(f"no early-exit weights for this {type(model).__name__} at {where}; "
                                        f"make them with `{MAKE}`, or pass early-exit:weights=FILE "
                                        "(weights=original runs the schedule on the model's own weights)")
    return found


def read_weights(model: torch.nn.Module, file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The fine-tuned tensors and metadata of ``file``, checked against ``model``."""
    tensors, meta = artifacts.read(file, "early-exit weights", MAKE, json_keys=("units", "train"))
    kind = type(model).__name__
    if meta.get("model_class") != kind:
        raise UserError(f"{file} holds early-exit weights for a {meta.get('model_class', 'unknown model')}, "
                        f"not this {kind}; make them for this model with `{MAKE}`")
    state = model.state_dict()
    wrong = [k for k, v in tensors.items() if k not in state or state[k].shape != v.shape]
    if wrong or not tensors:
        raise UserError(f"{file} does not fit this {kind} ({len(wrong)} tensors missing or of another shape"
                        f"{', e.g. ' + wrong[0] if wrong else ''}); make the weights for this model with `{MAKE}`")
    return tensors, meta


def swap_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], handle: CacheHandle) -> None:
    """Copy ``tensors`` into the model's parameters and buffers; ``handle.remove()`` copies the
    originals back (kept as clones, so the restored model is bit-identical)."""
    state = model.state_dict(keep_vars=True)
    originals = {k: state[k].detach().clone() for k in tensors}

    def restore() -> None:
        with torch.no_grad():
            for k, v in originals.items():
                state[k].copy_(v)

    handle.undo.append(restore)
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v.to(dtype=state[k].dtype, device=state[k].device))


def save_weights(file: str | Path, model: torch.nn.Module, schedule: ExitSchedule, train: dict,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write a fine-tuned denoiser's floating-point state (in ``dtype``) and its schedule."""
    tensors = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
               for k, v in model.state_dict().items()}
    meta = {"model_class": type(model).__name__, "schedule": schedule.text(),
            "units": [n for n, _ in skip_units(model)], "steps": str(train.get("steps", 0)),
            "timestep_scale": str(TIMESTEP_SCALE), "train": train}
    return artifacts.write(file, tensors, meta)


# ---- the accelerator ----------------------------------------------------------------------------
@dataclass
class EarlyExitConfig(CacheConfig):
    schedule: str = ""   # K0/K1/... skipped units per time bucket, or none; empty: the trained one
    weights: str = ""    # the fine-tuned weights; empty: MODEL/sdinfer_calibration/early-exit.safetensors;
    # "original": the model's own weights

    def __post_init__(self) -> None:
        if self.schedule:
            ExitSchedule.parse(str(self.schedule))


def apply_early_exit(model: torch.nn.Module, config: EarlyExitConfig, handle: CacheHandle) -> None:
    units = [n for n, _ in skip_units(model)]
    schedule = ExitSchedule.parse(config.schedule) if config.schedule else None
    if config.weights != "original":
        file = weights_file(model, config.weights)
        tensors, meta = read_weights(model, file)
        if meta.get("units") != units:
            raise UserError(f"{file} was trained for other skippable units than this {type(model).__name__}'s; "
                            f"make the weights for this model with `{MAKE}`")
        schedule = schedule or ExitSchedule.parse(meta["schedule"])
        swap_weights(model, tensors, handle)
    elif schedule is None:   # the trained schedule, read from the weights file beside the model
        try:
            _, meta = read_weights(model, weights_file(model, ""))
        except artifacts.MissingArtifact:
            raise UserError("early-exit:weights=original takes the trained schedule from the weights file beside "
                            "the model, and there is none: give schedule=K0/K1/... (skipped blocks per time "
                            "bucket, clean to noise)") from None
        schedule = ExitSchedule.parse(meta["schedule"])
    install_skips(model, ExitControl(schedule), handle)


def describe(file: str | Path) -> str:
    """One line about a weights file (for logs)."""
    _, meta = artifacts.read(file, "early-exit weights", MAKE, json_keys=("train",))
    return json.dumps({"model_class": meta.get("model_class"), "schedule": meta.get("schedule"),
                       "steps": meta.get("steps")})


__all__ = ["EarlyExitConfig", "ExitSchedule", "apply_early_exit", "skip_units", "save_weights"]
