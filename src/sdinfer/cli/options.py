"""Helpers shared by the commands: argument types, the options every model-running command
takes, output-file checks and the PNG writer.  Nothing here imports torch at module level, so
that ``sdinfer --help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import UserError

MODEL_HELP = ("default | unet | dit | unet-64 | dit-64 (the two fine-tuned at 64x64) | PATH to a diffusers "
              "pipeline folder (default: default, the shipped UNet)")


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' loading chatter (warnings and progress bars)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def steps_or_auto(text: str):
    return "auto" if text.strip().lower() == "auto" else whole_number(text)


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="torch device to run the model on: cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--dtype", default="float32",
                   help="precision of the model's weights and activations: float32, float16 or "
                        "bfloat16 (default: float32)")


def add_model_options(p, many_steps: bool = False) -> None:
    """--model, --sampler, --steps, --cfg, --seed, --size: what generate and bench share."""
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--sampler", default="ddim",
                   help="sampler with options, e.g. ddim, ddim:eta=1, ddpm, plms, dpm-solver++:order=3, "
                        "dpm-solver, unipc, euler, heun, or auto: per NFE (--steps) what validation chose for the model "
                        "and --cfg (sdinfer calibrate auto) (default: ddim)")
    if many_steps:
        p.add_argument("--steps", default="50", help="denoising steps; several as 10,20,50 (default: 50)")
    else:
        p.add_argument("--steps", type=steps_or_auto, default=50,
                       help="denoising steps, or auto: StepSaver predicts them per prompt (default: 50)")
    p.add_argument("--cfg", type=float, default=4.0,
                   help="classifier-free guidance scale; 1 turns guidance off (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    add_device_options(p)


def given(args, flag: str) -> bool:
    """Whether ``flag`` (e.g. ``--steps``) was on the command line, not left at its default."""
    return any(a == flag or a.startswith(flag + "=") for a in getattr(args, "argv", None) or [])


# a preset's fields and the flag / attribute each corresponds to
PRESET_FLAGS = {"model": ("--model", "model"), "sampler": ("--sampler", "sampler"), "steps": ("--steps", "steps"),
                "guidance_scale": ("--cfg", "cfg"), "spacing": ("--spacing", "spacing"),
                "analytic_first_step": ("--analytic-first-step", "analytic_first_step"),
                "accelerate": ("--accelerate", "accelerate")}


def apply_preset(args, fields, say) -> object:
    """Load ``--preset`` and set ``fields`` of ``args`` from it; a flag given explicitly wins over
    the preset, and ``say`` tells which (one line each).  Returns the preset (None without one)."""
    if not getattr(args, "preset", None):
        return None
    from ..tune.preset import load_preset

    preset = load_preset(args.preset)
    for name in fields:
        flag, attr = PRESET_FLAGS[name]
        value = getattr(preset, name)
        if given(args, flag):
            if getattr(args, attr) != value:
                say(f"note: {flag} {getattr(args, attr)} overrides the preset's {name} {value!r} "
                    f"({args.preset})")
            continue
        setattr(args, attr, value)
    return preset


def resolve_device_options(args):
    """``(device, dtype)`` from ``--device`` and ``--dtype``: a UserError before any model loads."""
    from ..devices import resolve_device, resolve_dtype

    return resolve_device(args.device), resolve_dtype(args.dtype)


def load_pipeline(args):
    """The pipeline of ``--model`` on ``--device`` in ``--dtype`` (checked first), libraries quiet."""
    from ..pipeline import Pipeline

    device, dtype = resolve_device_options(args)
    quiet_libraries()
    return Pipeline.from_pretrained(args.model, device=device, dtype=dtype)


def output_paths(out: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch)]


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    for p in paths:
        if p.suffix.lower() != ".png":
            raise UserError(f"output {p} must end in .png; pass e.g. -o {p.with_suffix('.png')}")
        if p.exists() and not overwrite:
            raise UserError(f"{p} exists; pass --overwrite to replace it or choose another -o")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"cannot write {p}: folder {parent} does not exist; create it first")
        try:  # os.access says yes to root even where writing fails, so try it
            fd, probe = tempfile.mkstemp(suffix=".tmp", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"cannot write {p}: folder {parent} is not writable ({err.strerror}); "
                            "choose another -o") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(image, path: Path, metadata: dict) -> None:
    """Write atomically (a temporary file in the same folder, renamed into place), with the
    permissions the user's umask gives a new file (mkstemp's own are 0600)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
