"""Training of LinFusion's linear attention by distillation from the model itself (resumable, seeded).

LinFusion (Liu et al. 2024, "LinFusion: 1 GPU, 1 Minute, 16K Image") trains only the new modules
(``distill.linfusion``: the linear stand-ins of the UNet's self-attention, their projections
initialized from the originals) with the original model as the teacher, on two losses:

    L = || eps_student(x_t, t, c) - eps_teacher(x_t, t, c) ||^2
        + lambda * mean_l || LinAttn_l(h_l) - Attn_l(h_l) ||^2

the student's prediction against the teacher's (here the model's own v-prediction), and per
self-attention layer l the linear attention's output against the original softmax attention's on
the same hidden states h_l (the student's).  Two stages here:

1. layer-wise (``layerwise_steps``): the teacher runs alone (no gradient through the UNet); each
   layer's captured input and softmax output train its stand-in on the feature loss: cheap;
2. end to end (the rest): the student runs with every stand-in mounted, the teacher alongside; L.

Data: the shapes data set's captions and images at the model's resolution, drawn as
``train-default`` draws them (the batch for step k from a generator seeded with (seed, k), the
held-out prompts excluded, 10% empty captions for guidance), noised at uniformly random
timesteps of the model's schedule.  A run resumed from its checkpoint (the stand-ins and AdamW's
moments as safetensors, the step, settings and log as JSON; nothing is pickled) continues exactly
as an uninterrupted one.  The result goes beside the model: ``MODEL/sdinfer_calibration/
linfusion.safetensors``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..cache.base import CacheHandle, hook_name
from ..errors import UserError
from ..models.calling import call_denoiser
from ..models.default import shapes
from ..models.default.checkpoint import adam_tensors, load_adam, read_meta, read_tensors, run_steps, write_checkpoint
from ..models.default.train import render_batch
from . import linfusion as lf


@dataclass
class LinFusionTrainConfig:
    model: str = "unet"
    steps: int = 1000
    layerwise_steps: int = 300     # stage 1 (feature distillation on captured inputs); the rest end to end
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    feature_weight: float = 1.0    # lambda of the per-layer feature loss
    caption_dropout: float = 0.1
    mid_dim: int = 0               # the refiner's mid width; 0: each layer's input width
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"linfusion --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.layerwise_steps < 0 or self.lr <= 0 or self.mid_dim < 0:
            raise UserError("linfusion: --layerwise-steps and --mid-dim must be >= 0 and --lr > 0")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay over the run."""
        lr = self.lr * min(1.0, (step + 1) / max(self.warmup, 1))
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / self.steps)))

    def continues(self, other: "LinFusionTrainConfig") -> bool:
        """Whether ``other`` only lengthens this run (every setting but ``steps`` equal)."""
        mine, theirs = asdict(self), asdict(other)
        mine.pop("steps"), theirs.pop("steps")
        return mine == theirs


class Capture(ModelHook):
    """Stage 1: keeps a self-attention layer's input and output of the teacher's pass."""

    def __init__(self, store: dict, where: str):
        super().__init__()
        self.store, self.where = store, where

    def new_forward(self, module, hidden_states, *args, **kwargs):
        out = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        self.store[self.where] = (hidden_states.detach(), out.detach())
        return out


class Distill(ModelHook):
    """Stage 2: runs the linear stand-in and records its feature loss against the original
    attention on the same input."""

    def __init__(self, linear: lf.LinearSelfAttention, losses: list):
        super().__init__()
        self.linear, self.losses = linear, losses

    def new_forward(self, module, hidden_states, *args, **kwargs):
        with torch.no_grad():
            reference = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        out = lf.run_in_place_of(module, self.linear, hidden_states)
        self.losses.append(F.mse_loss(out, reference))
        return out


class LinFusionTrainer:
    def __init__(self, cfg: LinFusionTrainConfig, run_dir: Path, pipe=None):
        from ..pipeline import Pipeline

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.pipe = pipe if pipe is not None else Pipeline.from_pretrained(cfg.model)
        self.unet = self.pipe.model.denoiser.float().eval().requires_grad_(False)
        self.pipe.model.text_encoder.requires_grad_(False)
        if int(self.unet.config.out_channels) != 3:
            raise UserError(f"linfusion training draws the shapes data set in pixels; {cfg.model} is a "
                            f"{self.unet.config.out_channels}-channel (latent) model: train on a default "
                            "model (unet, unet-64) or a pixel-space UNet of 3 channels")
        self.resolution = int(self.unet.config.sample_size)
        torch.manual_seed(cfg.seed)
        self.modules = lf.build_modules(self.unet, cfg.mid_dim or None)
        self.params = [p for m in self.modules.values() for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        schedule = self.pipe.model.schedule
        if not hasattr(schedule, "alphas_cumprod"):
            raise UserError(f"linfusion training noises samples on a diffusion schedule; {cfg.model} has a flow-matching one")
        ac = schedule.alphas_cumprod.float()
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        self.timesteps = len(ac)
        self.heldout = frozenset(shapes.heldout_prompts())
        self.step, self.log = 0, []

    # ---- data -------------------------------------------------------------
    def batch(self, step: int):
        cfg = self.cfg
        images, captions = render_batch(cfg.seed, cfg.batch_size, cfg.caption_dropout, step,
                                        self.heldout, self.resolution)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        g = torch.Generator().manual_seed(cfg.seed * 7_000_001 + step)
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = self.alpha[t].view(-1, 1, 1, 1) * x0 + self.sigma[t].view(-1, 1, 1, 1) * noise
        return xt, t, self.pipe.encode(captions)

    # ---- the two stages -----------------------------------------------------
    def layerwise_loss(self, xt, t, text) -> torch.Tensor:
        store: dict = {}
        with self._hooks(lambda where, module: Capture(store, where)), torch.no_grad():
            call_denoiser(self.unet, xt, t, text)
        losses = [F.mse_loss(lf.run_in_place_of(attn, self.modules[where], store[where][0]), store[where][1])
                  for where, attn in lf.self_attention_layers(self.unet)]
        return self.cfg.feature_weight * torch.stack(losses).mean()

    def end_to_end_loss(self, xt, t, text) -> torch.Tensor:
        with torch.no_grad():
            teacher = call_denoiser(self.unet, xt, t, text)
        features: list = []
        with self._hooks(lambda where, module: Distill(self.modules[where], features)):
            student = call_denoiser(self.unet, xt, t, text)
        return F.mse_loss(student, teacher) + self.cfg.feature_weight * torch.stack(features).mean()

    def _hooks(self, make):
        trainer = self

        class Mounted:
            def __enter__(self):
                self.handle = CacheHandle("linfusion-train")
                name = hook_name("linfusion_train")
                for where, attn in lf.self_attention_layers(trainer.unet):
                    self.handle.register(attn, make(where, attn), name)

            def __exit__(self, *exc):
                self.handle.remove()

        return Mounted()

    def train_step(self) -> float:
        xt, t, text = self.batch(self.step)
        stage1 = self.step < self.cfg.layerwise_steps
        loss = (self.layerwise_loss if stage1 else self.end_to_end_loss)(xt, t, text)
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.learning_rate(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    # ---- checkpoints --------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{w}.{k}": v.detach() for w, m in self.modules.items() for k, v in m.state_dict().items()}
        tensors.update(adam_tensors(self.opt, self.params))
        return tensors

    def save(self) -> None:
        write_checkpoint(self.run_dir, self.state_tensors(), {"step": self.step, "config": asdict(self.cfg),
                                                              "log": self.log})

    def try_resume(self) -> bool:
        meta = read_meta(self.run_dir)
        if meta is None:
            return False
        saved = LinFusionTrainConfig(**meta["config"])
        if not saved.continues(self.cfg):   # a longer --steps continues it (its cosine stretched)
            raise UserError(f"{self.run_dir} holds a linfusion run with other settings ({meta['config']}); "
                            "repeat that command to resume it, or pass a new --run-dir")
        tensors = read_tensors(self.run_dir)
        with torch.no_grad():
            for w, m in self.modules.items():
                m.load_state_dict({k[len(w) + 1:]: v for k, v in tensors.items() if k.startswith(w + ".")})
        load_adam(self.opt, self.params, tensors)
        self.step, self.log = meta["step"], meta["log"]
        return True

    # ---- loop ---------------------------------------------------------------
    def run(self, max_minutes: float | None = None, log_every: int = 10, stop_at: int | None = None) -> None:
        """Train to the end of the run, or for ``max_minutes``, or to step ``stop_at`` (resumably)."""
        run_steps(self, min(self.cfg.steps, stop_at or self.cfg.steps), self.cfg.checkpoint_every, max_minutes,
                  log_every)

    def export(self, out: str | Path | None = None) -> Path:
        """Write the trained stand-ins (the model's linfusion.safetensors, or ``out``)."""
        from ..models import artifacts

        if out is None:
            folder = self.pipe.model.path if getattr(self.pipe.model, "path", None) else artifacts.model_folder(self.unet)
            if folder is None:
                raise UserError("this model came from no folder; pass --out FILE for the linfusion weights")
            out = artifacts.writable_path(folder, lf.KIND)
        return lf.save(out, self.unet, self.modules, self.step,
                       {"train_config": asdict(self.cfg), "final_loss": self.log[-1]["loss"] if self.log else None})


def train(cfg: LinFusionTrainConfig, run_dir: Path, max_minutes: float | None = None,
          threads: int | None = None, pipe=None, stop_at: int | None = None) -> LinFusionTrainer:
    if threads:
        torch.set_num_threads(threads)
    trainer = LinFusionTrainer(cfg, run_dir, pipe)
    if trainer.try_resume():
        print(f"resumed {run_dir} at step {trainer.step}", flush=True)
    trainer.run(max_minutes, stop_at=stop_at)
    trainer.save()
    return trainer
