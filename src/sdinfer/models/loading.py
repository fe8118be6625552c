"""Loading models from disk: the shipped default models and diffusers folders.

A folder is a diffusers pipeline (``model_index.json`` naming its components)
or a single model folder (``config.json`` with ``_class_name``).  Components are
loaded with their own library's ``from_pretrained``, safetensors only: every
weights file is checked to be a complete safetensors file before loading, and
pickled weights (``.bin``, ``.pt``, ``.ckpt``) are refused.
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..schedules import FlowMatchSchedule, NoiseSchedule
from .calling import signature_of
from .quiet import quiet_loading

DEFAULT_DIR = Path(__file__).parent / "default" / "weights"
# the two default models, and the same fine-tuned at 64x64 (for the multi-device strategies)
DEFAULT_MODELS = {name: DEFAULT_DIR / name for name in ("unet", "dit", "unet-64", "dit-64")}
DEFAULT_ALIASES = {"default": "unet"}
DENOISER_COMPONENTS = ("unet", "transformer")
# the text encoders of a pipeline, by diffusers' component names (FLUX has two, SD3 three)
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """What a generation needs, whatever folder it came from."""

    name: str
    path: Path
    denoiser: torch.nn.Module
    schedule: NoiseSchedule | FlowMatchSchedule
    prediction_type: str
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    vae: torch.nn.Module | None = None
    scheduler_config: dict = field(default_factory=dict)
    # the further text encoders of a FLUX / SD3 pipeline (``models/text_encoding.py`` combines them)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    pipeline_class: str = ""    # model_index.json's _class_name

    def schedule_at(self, size: int | None) -> NoiseSchedule | FlowMatchSchedule:
        """The schedule for images of side ``size``: a resolution-dependent flow shift (FLUX's
        ``use_dynamic_shifting``) is set by the image's token count; every other schedule is fixed."""
        if size is None or not self.scheduler_config.get("use_dynamic_shifting"):
            return self.schedule
        return _flow_schedule(self.scheduler_config, self.path, (size // self.spatial_factor) ** 2)

    @property
    def family(self) -> str:
        return type(self.denoiser).__name__

    @property
    def sample_channels(self) -> int:
        """Channels of the sample the loop denoises (the model's input less coordinate channels)."""
        cfg = self.denoiser.config
        packing = signature_of(self.denoiser).packing
        if packing > 1:   # FLUX: the model takes (packing x packing) patches of the latent as tokens
            return int(cfg.in_channels) // packing ** 2
        out = int(getattr(cfg, "out_channels", None) or cfg.in_channels)
        return out if int(cfg.in_channels) - out == 2 else int(cfg.in_channels)

    @property
    def vae_factor(self) -> int:
        """How many pixels one sample element spans (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser_factor(self) -> int:
        """The sample's side must be a multiple of this (patch size or UNet downsampling)."""
        cfg = self.denoiser.config
        packing = signature_of(self.denoiser).packing
        if getattr(cfg, "patch_size", None):
            return int(cfg.patch_size) * packing
        if hasattr(cfg, "block_out_channels"):
            return 2 ** (len(cfg.block_out_channels) - 1)
        return packing

    @property
    def spatial_factor(self) -> int:
        """Image sizes must be multiples of this."""
        return self.vae_factor * self.denoiser_factor

    @property
    def max_size(self) -> int | None:
        """The largest image side the model takes (a cropped positional table), or None."""
        cfg = self.denoiser.config
        if getattr(cfg, "pos_embed_max_size", None):
            return int(cfg.pos_embed_max_size) * self.spatial_factor
        return None

    @property
    def native_size(self) -> int:
        """The image size the model was configured for (a FLUX transformer names none: its VAE's)."""
        sample_size = getattr(self.denoiser.config, "sample_size", None)
        if sample_size is None and self.vae is not None:
            return int(self.vae.config.sample_size)
        return int(sample_size) * self.vae_factor

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights are (the text encoder and VAE are loaded beside it)."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def num_parameters(self) -> int:
        mods = [self.denoiser, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae]
        return sum(p.numel() for m in mods if m is not None for p in m.parameters())


def resolve(name_or_path: str | Path) -> tuple[str, Path]:
    key = str(name_or_path)
    key = DEFAULT_ALIASES.get(key, key)
    if key in DEFAULT_MODELS:
        return key, DEFAULT_MODELS[key]
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(
            f"model {str(name_or_path)!r} is neither a shipped model "
            f"({', '.join(['default', *DEFAULT_MODELS])}) nor an existing path; "
            "pass one of those names or a folder saved with save_pretrained")
    if not path.is_dir():
        raise UserError(f"model path {path} is a file; pass the folder that holds "
                        "model_index.json (a pipeline) or config.json (a model)")
    return path.name, path


def check_safetensors(path: Path) -> None:
    """Refuse a file that is not a complete safetensors file, without unpickling anything."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"weights file {path} is not a valid safetensors file ({err}); "
                        "re-save the model with save_pretrained(safe_serialization=True)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(f"weights file {path} is truncated ({size} bytes, needs "
                        f"{8 + header_len + end}); copy or download it again")


def check_component_folder(folder: Path) -> None:
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    weights = list(folder.glob("*.safetensors"))
    if pickled and not weights:
        raise UserError(f"{folder} holds only pickled weights ({', '.join(pickled)}); sdinfer "
                        "loads safetensors only: re-save with save_pretrained(safe_serialization=True)")
    for w in weights:
        check_safetensors(w)


def _load_component(folder: Path, library: str, class_name: str, dtype: torch.dtype):
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        raise UserError(f"{folder} names component class {library}.{class_name}, which is not "
                        f"installed; install {library} or re-save the pipeline") from None
    if class_name.endswith("Tokenizer") or class_name.endswith("TokenizerFast"):
        return cls.from_pretrained(str(folder))
    from ..quant.folder import is_quantized_folder, load_quantized

    if library == "diffusers" and is_quantized_folder(folder):
        return load_quantized(folder, cls, dtype)
    check_component_folder(folder)
    kwargs = {}
    if library == "diffusers":
        kwargs = {"use_safetensors": True, "torch_dtype": dtype}
    elif library == "transformers":
        kwargs = {"use_safetensors": True, "dtype": dtype}
    try:
        with warnings.catch_warnings(), quiet_loading():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(folder), **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is the folder's fault here
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load {class_name} from {folder}: {first}; check that the "
                        "folder was written by save_pretrained") from None
    return model.eval()


def load_model(name_or_path: str | Path, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str | None = None) -> LoadedModel:
    """Load a shipped default model or a diffusers folder, its modules in ``dtype`` on
    ``device`` (names or torch objects, checked by ``sdinfer.devices``; default CPU float32)."""
    from ..devices import check_combination, resolve_device, resolve_dtype

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    check_combination(device, dtype)
    model = _load_model(name_or_path, dtype)
    for module in (model.denoiser, model.text_encoder, model.vae):
        if module is not None and device.type != "cpu":
            module.to(device)
    return model


def _load_model(name_or_path: str | Path, dtype: torch.dtype) -> LoadedModel:
    name, path = resolve(name_or_path)
    index = path / "model_index.json"
    if index.exists():
        try:
            spec = json.loads(index.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{index} is not valid JSON ({err}); re-save the pipeline") from None
        parts = {}
        for comp in (*DENOISER_COMPONENTS, *TEXT_COMPONENTS, "vae"):
            entry = spec.get(comp)
            if entry and entry[0] is not None and (path / comp).is_dir():
                parts[comp] = _load_component(path / comp, entry[0], entry[1], dtype)
        denoisers = [parts[c] for c in DENOISER_COMPONENTS if c in parts]
        if not denoisers:
            raise UserError(f"pipeline {path} has no unet or transformer folder; pass a "
                            "text-to-image pipeline saved with save_pretrained")
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched_cfg = json.loads(sched_file.read_text()) if sched_file.exists() else {}
        flow = sched_cfg.get("_class_name", "").startswith("FlowMatch")
        model = LoadedModel(name=name, path=path, denoiser=denoisers[0], schedule=_schedule(sched_cfg, path),
                            prediction_type="flow" if flow else sched_cfg.get("prediction_type", "epsilon"),
                            vae=parts.get("vae"), scheduler_config=sched_cfg,
                            pipeline_class=str(spec.get("_class_name", "")),
                            **{comp: parts.get(comp) for comp in TEXT_COMPONENTS})
        if sched_cfg.get("use_dynamic_shifting"):   # the shift at the model's own size
            model.schedule = model.schedule_at(model.native_size)
    elif (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        cls = cfg.get("_class_name")
        if not cls:
            raise UserError(f"{path}/config.json has no _class_name: not a diffusers model folder; "
                            "pass a folder saved with save_pretrained")
        raise UserError(f"{path} is a bare {cls} folder with no text encoder or scheduler; pass "
                        "the pipeline folder that holds it (the one with model_index.json)")
    else:
        raise UserError(f"{path} is not a diffusers model: it has neither model_index.json nor "
                        "config.json; pass a folder saved with save_pretrained")
    for suffix in ("", "_2", "_3"):
        if getattr(model, f"text_encoder{suffix}") is not None and getattr(model, f"tokenizer{suffix}") is None:
            raise UserError(f"pipeline {path} has a text_encoder{suffix} but no tokenizer{suffix} folder; re-save it")
    return model


def _schedule(cfg: dict, path: Path) -> NoiseSchedule | FlowMatchSchedule:
    if not cfg:
        raise UserError(f"pipeline {path} has no scheduler/scheduler_config.json; re-save it "
                        "with its scheduler")
    if cfg.get("_class_name", "").startswith("FlowMatch"):
        # a dynamic shift is set per image size (``LoadedModel.schedule_at``); any shift until then
        return _flow_schedule(cfg, path, None)
    try:
        return NoiseSchedule.from_diffusers_config(cfg)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def _flow_schedule(cfg: dict, path: Path, image_tokens: int | None) -> FlowMatchSchedule:
    """A flow-matching schedule; with ``use_dynamic_shifting`` (FLUX), the shift for an image of
    ``image_tokens`` tokens: mu linear in the token count from ``base_shift`` at
    ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``, and shift = e^mu (diffusers'
    exponential time shift e^mu / (e^mu + 1/t - 1) is the fixed shift e^mu)."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if not cfg.get("use_dynamic_shifting"):
        try:
            return FlowMatchSchedule.from_diffusers_config(cfg)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
    if cfg.get("time_shift_type", "exponential") != "exponential":
        raise UserError(f"{path}: the {cfg['time_shift_type']} time shift is not supported; sdinfer takes the "
                        "exponential one (FLUX's): set time_shift_type to exponential in the scheduler config")
    if image_tokens is None:
        return FlowMatchSchedule(n, 1.0)
    base_len, max_len = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
    base_shift, max_shift = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = base_shift + slope * (image_tokens - base_len)
    return FlowMatchSchedule(n, math.exp(mu))
