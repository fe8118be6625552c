"""The files sdinfer keeps beside a model: where each lives, and how it is written and read.

Every artifact (DPM-Solver-v3's statistics, GITS's grid, learned grids, the StepSaver predictor,
a cache's calibration) is one safetensors file in the model folder's ``sdinfer_calibration/``:

    MODEL/sdinfer_calibration/KIND.safetensors           (teacache, magcache, stepsaver, ...)
    MODEL/sdinfer_calibration/KIND-cfgG.safetensors      (dpm-solver-v3, gits, learned-grid, auto-sampler)

MODEL is the pipeline folder (the one with ``model_index.json``), or the denoiser's own folder
when it was saved alone.  Kinds measured under classifier-free guidance are kept per guidance
scale G.  Folders written before this layout (``MODEL/dpm_solver_v3/cfgG.safetensors``,
``MODEL/gits/...``, ``MODEL/learned_grid/...``, ``MODEL/stepsaver.safetensors`` and
``MODEL/<denoiser>/sdinfer_calibration/KIND.safetensors``) are still found by ``find``; the
calibrate commands write to the layout above (``writable_path`` moves an old file there first).

Files are read without unpickling anything: ``read`` opens safetensors only, and a missing,
truncated or foreign file is one ``UserError`` naming the file and the command that makes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

ARTIFACT_DIR = "sdinfer_calibration"
SUFFIX = ".safetensors"
PER_GUIDANCE = ("dpm-solver-v3", "gits", "learned-grid", "auto-sampler")
# the folders of the first layout, one per kind measured under guidance
_OLD_GUIDANCE_DIRS = {"dpm-solver-v3": "dpm_solver_v3", "gits": "gits", "learned-grid": "learned_grid"}


class MissingArtifact(UserError, FileNotFoundError):
    """An artifact file that does not exist (a ``UserError`` and a ``FileNotFoundError``)."""


def _check_scale(kind: str, guidance_scale: float | None) -> None:
    if (kind in PER_GUIDANCE) != (guidance_scale is not None):
        need = "needs a guidance scale" if kind in PER_GUIDANCE else "is not kept per guidance scale"
        raise ValueError(f"artifact kind {kind!r} {need}")


def path(folder: str | Path, kind: str, guidance_scale: float | None = None) -> Path:
    """Where artifact ``kind`` of the model in ``folder`` is written (the current layout)."""
    _check_scale(kind, guidance_scale)
    name = kind if guidance_scale is None else f"{kind}-cfg{guidance_scale:g}"
    return Path(folder) / ARTIFACT_DIR / f"{name}{SUFFIX}"


def old_paths(folder: str | Path, kind: str, guidance_scale: float | None = None) -> list[Path]:
    """The existing files of artifact ``kind`` where the layout before ``path``'s kept it."""
    _check_scale(kind, guidance_scale)
    folder = Path(folder)
    if kind in _OLD_GUIDANCE_DIRS:
        candidates = [folder / _OLD_GUIDANCE_DIRS[kind] / f"cfg{guidance_scale:g}{SUFFIX}"]
    elif kind == "stepsaver":
        candidates = [folder / f"stepsaver{SUFFIX}"]
    else:  # caches kept theirs in the denoiser's folder
        candidates = sorted(folder.glob(f"*/{ARTIFACT_DIR}/{kind}{SUFFIX}"))
    return [p for p in candidates if p.is_file()]


def find(folder: str | Path | None, kind: str, guidance_scale: float | None = None) -> Path | None:
    """The existing file of artifact ``kind`` for the model in ``folder`` (the current layout
    first, then the old one), or None."""
    if folder is None:
        return None
    current = path(folder, kind, guidance_scale)
    if current.is_file():
        return current
    old = old_paths(folder, kind, guidance_scale)
    return old[0] if old else None


def writable_path(folder: str | Path, kind: str, guidance_scale: float | None = None) -> Path:
    """The path to write ``kind`` to (the current layout's), with a file of the old layout moved
    there first, so that it is the file a calibration replaces or updates."""
    current = path(folder, kind, guidance_scale)
    old = old_paths(folder, kind, guidance_scale)
    if not current.exists() and old:
        current.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old[0], current)
    return current


def model_folder(module: torch.nn.Module) -> Path | None:
    """The model folder of a loaded diffusers model: the pipeline folder when it was loaded as a
    pipeline component, else the folder it was loaded from; None if it came from no folder."""
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    folder = Path(name)
    return folder.parent if (folder.parent / "model_index.json").is_file() else folder


def write(file: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` (strings as they are, anything else as JSON) to
    ``file``, replacing it whole: an interrupted write leaves the old file."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    partial = file.with_name(file.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial), metadata=header)
    os.replace(partial, file)
    return file


def read(file: str | Path, what: str, make: str,
         json_keys: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of the safetensors file ``file`` (the entries named in
    ``json_keys`` decoded from JSON, absent ones left out).  ``what`` names the artifact and
    ``make`` the command that makes it, for the errors: a missing file is ``MissingArtifact``,
    a truncated, foreign or unparsable one ``UserError``."""
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    if not file.is_file():
        raise MissingArtifact(f"no {what} at {file} (the file does not exist); make it with `{make}`")
    try:
        with safe_open(str(file), "pt") as f:
            metadata: dict[str, Any] = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key in json_keys:
            if key in metadata:
                metadata[key] = json.loads(metadata[key])
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not a readable safetensors {what} file ({err}); "
                        f"make it again with `{make}`") from None
    return tensors, metadata
