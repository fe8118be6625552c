"""Writing a trained default model as a diffusers pipeline folder (safetensors, fp16)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers

from . import architectures as arch_mod

DENOISER_FOLDER = {"unet": "unet", "dit": "transformer"}


def export_pipeline(trainer, out_dir: Path, use_ema: bool = True,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Save the trainer's (EMA) weights as a pipeline folder loadable by ``load_model``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch = trainer.cfg.arch
    denoiser = arch_mod.build_denoiser(arch, 0, trainer.cfg.resolution)
    text_encoder = arch_mod.build_text_encoder(0)
    if use_ema:
        denoiser.load_state_dict(_with_buffers(denoiser, trainer.ema_state("model")))
        text_encoder.load_state_dict(_with_buffers(text_encoder, trainer.ema_state("text")))
    else:
        denoiser.load_state_dict(trainer.model.state_dict())
        text_encoder.load_state_dict(trainer.text_encoder.state_dict())
    folder = DENOISER_FOLDER[arch]
    denoiser.to(dtype).save_pretrained(out_dir / folder, safe_serialization=True)
    text_encoder.to(dtype).save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    trainer.tokenizer.save_pretrained(out_dir / "tokenizer")
    arch_mod.build_scheduler().save_pretrained(out_dir / "scheduler")
    index = {
        "_class_name": "SdinferShapesPipeline",
        "_diffusers_version": diffusers.__version__,
        folder: ["diffusers", type(denoiser).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "sdinfer": {"arch": arch, "training_steps": trainer.step,
                    "resolution": trainer.cfg.resolution, "init_from": trainer.cfg.init_from,
                    "transformers_version": transformers.__version__},
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _with_buffers(module: torch.nn.Module, params: dict) -> dict:
    state = module.state_dict()
    state.update(params)
    return state
