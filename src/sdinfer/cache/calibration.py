"""Calibration data of the caches that learn from the model they accelerate (TeaCache's rescaling
polynomial, MagCache's magnitude ratios, Block Caching's change profile, Learning-to-Cache's
router): where it lives, how it is written and read, and the runs that record it.

A calibration is one safetensors file of tensors plus a JSON metadata entry, kept beside the
model (``MODEL/sdinfer_calibration/<method>.safetensors``, see ``models/artifacts.py``) so that
``sdinfer.accelerate(pipe, "teacache")`` finds it with no path, or anywhere with the method's
``calibration=PATH`` knob.  ``sdinfer calibrate --method NAME`` makes it: each method registers a
``Calibrator`` in ``CALIBRATORS`` that runs the model on calibration prompts (never held-out
ones) and returns the tensors and metadata to save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..models import artifacts

CALIBRATION_DIR = artifacts.ARTIFACT_DIR
META_KEY = "sdinfer_cache_calibration"


@dataclass
class Calibration:
    method: str
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return artifacts.write(path, self.tensors, {META_KEY: {"method": self.method, **self.meta}})

    @classmethod
    def load(cls, path: str | Path, method: str) -> "Calibration":
        tensors, header = artifacts.read(path, "calibration", f"sdinfer calibrate --method {method}",
                                         json_keys=(META_KEY,))
        meta = header.get(META_KEY, {})
        meta = dict(meta) if isinstance(meta, dict) else {}
        if meta.get("method") != method:
            raise ValueError(f"{path} holds calibration for {meta.get('method', 'no cache method')!r}, "
                             f"not {method!r}; remake it with `sdinfer calibrate --method {method}`")
        meta.pop("method")
        return cls(method, tensors, meta)


def default_path(model: torch.nn.Module, method: str) -> Path | None:
    """Where ``method``'s calibration of ``model`` is written (None: not loaded from a folder)."""
    folder = artifacts.model_folder(model)
    return None if folder is None else artifacts.path(folder, method)


def load_for(model: torch.nn.Module, method: str, given: str = "") -> Calibration:
    """The calibration of ``method`` for ``model``: from ``given`` (a path) or beside the model's
    weights; a clear error saying how to make it when there is none."""
    path = Path(given) if given else (artifacts.find(artifacts.model_folder(model), method) or default_path(model, method))
    if path is None or not path.is_file():
        where = f"at {path}" if path is not None else f"for this {type(model).__name__} (not loaded from a folder)"
        raise ValueError(f"{method} needs calibration data, and there is none {where}: run "
                         f"`sdinfer calibrate --method {method} --model MODEL` or pass {method}:calibration=PATH")
    return Calibration.load(path, method)


@dataclass
class CalibrationRun:
    """What a calibrator runs: the pipeline, its prompts and the sampling settings."""

    pipe: object            # sdinfer.pipeline.Pipeline
    prompts: list[str]
    steps: int = 50
    sampler: str = "ddim"
    guidance_scale: float = 4.0
    seed: int = 0
    batch: int = 8

    def generate(self) -> None:
        """Run every prompt once (batched); the calibrator's hooks record what they need."""
        for start in range(0, len(self.prompts), self.batch):
            self.pipe(self.prompts[start:start + self.batch], steps=self.steps, sampler=self.sampler,
                      guidance_scale=self.guidance_scale, seed=self.seed + start)


Calibrator = Callable[[CalibrationRun], Calibration]
CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(method: str, calibrator: Calibrator) -> None:
    CALIBRATORS[method] = calibrator
