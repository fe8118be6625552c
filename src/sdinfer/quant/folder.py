"""The quantized model folder: a diffusers pipeline folder whose denoiser holds packed codes.

``save_quantized`` copies the source pipeline folder (text encoders, tokenizers, scheduler, VAE,
calibration artifacts) and writes the denoiser's folder as its ``config.json`` and one
``sdinfer_quantized.safetensors``: the model's whole state, in which each quantized layer is its
packed codes (uint8), its value table or codebook, its scales, its bias and any activation
scales (per timestep where calibrated so), and every other parameter in full precision.  The
metadata names the method, its settings, the calibration and each quantized layer's layout.

``models/loading.py`` loads such a component through ``load_quantized``: the model is built from
its config, each listed layer replaced by a ``QuantizedLayer`` built from its tensors, and the
state loaded strictly, so a missing, extra or damaged entry is an error naming the file.  So
``--model DIR`` takes the folder wherever a model is taken (generate, bench, serve, --parallel,
caches).  safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .layers import QuantizedLayer

FILE = "sdinfer_quantized.safetensors"
FORMAT = "sdinfer-quantized"
VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_quantized_folder(folder: Path) -> bool:
    return (Path(folder) / FILE).is_file()


def _source_folder(handle, source) -> Path:
    from ..models.artifacts import model_folder

    folder = Path(source) if source is not None else model_folder(handle.model)
    if folder is None or not (folder / "model_index.json").is_file():
        raise UserError("cannot tell which pipeline folder the quantized model came from; pass source= the "
                        "folder with model_index.json (save() writes a whole pipeline folder)")
    return folder


def _denoiser_dir(source: Path) -> str:
    index = json.loads((source / "model_index.json").read_text())
    for comp in ("unet", "transformer"):
        if index.get(comp) and (source / comp).is_dir():
            return comp
    raise UserError(f"pipeline {source} has no unet or transformer folder")


def save_quantized(handle, out, source=None, overwrite: bool = False) -> Path:
    """Write ``handle``'s quantized model as a pipeline folder at ``out`` (a new or empty folder,
    unless ``overwrite``)."""
    from ..models.artifacts import write

    source = _source_folder(handle, source)
    out = Path(out)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the model's own folder; give a new folder for the quantized model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; give a new folder (or --overwrite to replace it)")
    comp = _denoiser_dir(source)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out, ignore=lambda d, names: [
        n for n in names if Path(d).resolve() == (source / comp).resolve() and n.endswith(WEIGHT_SUFFIXES)])
    state = {k: v.detach().cpu().clone() for k, v in handle.model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "class": type(handle.model).__name__,
            "method": handle.method, "settings": handle.settings, "calibration": handle.calibration,
            "bits_per_weight": round(handle.bits_per_weight(), 4),
            "layers": {name: layer.layout() for name, layer in handle.layers.items()}}
    write(out / comp / FILE, state, meta)
    return out


def read_metadata(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from ..models.artifacts import read
    from ..models.loading import check_safetensors

    file = Path(folder) / FILE
    check_safetensors(file)
    make = "sdinfer quantize --model MODEL --method SPEC --out DIR"
    tensors, meta = read(file, "quantized model", make, json_keys=("settings", "calibration", "layers"))
    if meta.get("format") != FORMAT:
        raise UserError(f"{file} is not an sdinfer quantized model (its metadata names no {FORMAT!r} format); "
                        f"make it with `{make}`")
    if meta.get("version") != VERSION:
        raise UserError(f"{file} is version {meta.get('version')} of the quantized format; this sdinfer reads "
                        f"version {VERSION}: quantize the model again")
    return tensors, meta


def load_quantized(folder: Path, cls, dtype: torch.dtype) -> torch.nn.Module:
    """The model of class ``cls`` in ``folder``: built from its config, its quantized layers put in."""
    from .base import Quantized

    folder = Path(folder)
    tensors, meta = read_metadata(folder)
    if meta.get("class") != cls.__name__:
        raise UserError(f"{folder / FILE} holds a quantized {meta.get('class')}, but the folder's config names "
                        f"{cls.__name__}; quantize the model again")
    from ..models.quiet import quiet_loading

    with quiet_loading():
        model = cls.from_config(cls.load_config(str(folder)))
    layers = {}
    try:
        for name, layout in meta["layers"].items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            layers[name] = QuantizedLayer.from_layout(layout, own)
            model.set_submodule(name, layers[name])
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (KeyError, AttributeError, RuntimeError, ValueError) as err:
        raise UserError(f"{folder / FILE} does not fit the model its config describes ({err}); the file is "
                        "damaged or from another model: quantize the model again") from None
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        raise UserError(f"{folder / FILE} does not fit the model: {'missing' if missing else 'unexpected'} "
                        f"entries ({shown}); the file is damaged: quantize the model again")
    model = model.to(dtype).eval()
    model.sdinfer_quantization = Quantized(model, meta["method"], meta["settings"], layers,
                                           calibration=meta.get("calibration", {}))
    return model
