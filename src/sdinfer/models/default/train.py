"""Training of the default models on the shapes data set (resumable, seeded).

Objective: v-prediction (Salimans & Ho 2022), either plain (weight 1 on the v
error, i.e. SNR + 1 on the x0 error) or with Min-SNR-gamma weighting (Hang et
al. 2023, weight min(SNR, gamma) / (SNR + 1) for v).  Min-SNR gives the
high-noise steps, where layout and colour are decided, almost no weight
(SNR < 0.1 for half of the linear schedule's steps): with it the default models
hardly learned to follow the text (BENCHMARKS.md, "History"), so both default
models train with the plain loss.  Caption dropout for classifier-free
guidance (Ho & Salimans 2022) and an EMA of the weights complete it.
The batch for step k is drawn from a generator seeded with (seed, k), so a run
resumed from a checkpoint sees exactly the data an uninterrupted run would, and
worker processes can render batches ahead of the step that needs them.  The
model trains on any torch device; data, noise and timesteps are drawn on the CPU
so that a run means the same samples wherever it trains.

Checkpoints are safetensors (model, EMA, text encoder, optimiser moments) plus
a JSON file; nothing is pickled.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ...errors import UserError
from ..calling import TextConditioning, call_denoiser
from . import architectures as arch_mod
from . import shapes
from .checkpoint import adam_tensors, load_adam, read_meta, read_tensors, run_steps, write_checkpoint


@dataclass
class TrainConfig:
    arch: str = "unet"
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float | None = 5.0  # None: plain v-prediction loss
    caption_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 200
    # steps at which the cosine schedule restarts with a new warm-up (SGDR, Loshchilov &
    # Hutter 2017): a finished run extends by a restart without changing its past
    restarts: tuple[int, ...] = ()
    resolution: int = shapes.RESOLUTION
    # a pipeline folder or shipped model name whose weights start the run (fine-tuning,
    # e.g. at another resolution); None: freshly initialised
    init_from: str | None = None

    def __post_init__(self):
        self.restarts = tuple(int(r) for r in self.restarts)
        if self.resolution < 8 or self.resolution % 4:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 4, at least 8 "
                             "(the UNet halves it twice, the DiT cuts 2x2 patches)")
        bounds = (0, *self.restarts, self.steps)
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"restarts {self.restarts} must increase strictly inside (0, steps={self.steps})")

    def learning_rate(self, step: int) -> float:
        """Linear warm-up then cosine decay, within the cycle that holds ``step``."""
        bounds = (0, *self.restarts, self.steps)
        start = max(b for b in bounds[:-1] if b <= step)
        end = bounds[bounds.index(start) + 1]
        lr = self.lr * min(1.0, (step - start + 1) / self.warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / (end - start))))

    def continues(self, other: "TrainConfig", done_steps: int) -> bool:
        """True if ``other``'s first ``done_steps`` steps are exactly this run's: the same
        settings and learning rates (only the run's length and later restarts may differ)."""
        mine, theirs = asdict(self), asdict(other)
        for key in ("steps", "restarts"):
            mine.pop(key), theirs.pop(key)
        return mine == theirs and all(
            self.learning_rate(s) == other.learning_rate(s) for s in range(done_steps))


def render_batch(seed: int, batch_size: int, caption_dropout: float, step: int,
                 heldout: frozenset[str], res: int = shapes.RESOLUTION) -> tuple[np.ndarray, list[str]]:
    """The images (uint8, B x res x res x 3) and captions of training step ``step``."""
    seed = seed * 1_000_003 + step
    specs = shapes.sample_specs(batch_size, seed, set(heldout))
    rng = np.random.default_rng(seed + 7)
    images = np.stack([shapes.render(s, rng, res) for s in specs])
    captions = [s.caption if rng.random() >= caption_dropout else "" for s in specs]
    return images, captions


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, device: str | torch.device = "cpu",
                 data_workers: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = arch_mod.build_tokenizer()
        self.text_encoder = arch_mod.build_text_encoder(cfg.seed).to(self.device)
        self.model = arch_mod.build_denoiser(cfg.arch, cfg.seed, cfg.resolution)
        if cfg.init_from is not None:
            load_initial_weights(self.model, self.text_encoder, cfg.arch, cfg.init_from)
        self.model.to(self.device)
        self.ema = {k: v.detach().clone() for k, v in self._params().items()}
        self.scheduler = arch_mod.build_scheduler()
        ac = self.scheduler.alphas_cumprod.to(torch.float32)
        self.alpha = ac.sqrt()
        self.sigma = (1 - ac).sqrt()
        self.snr = ac / (1 - ac)
        self.alpha, self.sigma, self.snr = (v.to(self.device) for v in (self.alpha, self.sigma, self.snr))
        self.opt = torch.optim.AdamW(self._params().values(), lr=cfg.lr, weight_decay=0.0)
        self.step = 0
        self.log: list[dict] = []
        self.heldout = frozenset(shapes.heldout_prompts())
        self.data_workers = data_workers
        self._pool: ProcessPoolExecutor | None = None
        self._ahead: dict[int, object] = {}

    def _params(self) -> dict[str, torch.nn.Parameter]:
        out = {f"model.{k}": p for k, p in self.model.named_parameters()}
        out.update({f"text.{k}": p for k, p in self.text_encoder.named_parameters()})
        return out

    # ---- data -------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        args = (self.cfg.seed, self.cfg.batch_size, self.cfg.caption_dropout)
        more = (self.heldout, self.cfg.resolution)
        if self.data_workers > 0:
            if self._pool is None:
                # spawned, not forked: the trainer's process may hold a CUDA context
                self._pool = ProcessPoolExecutor(self.data_workers,
                                                 mp_context=multiprocessing.get_context("spawn"))
            for k in range(step, min(step + 4 * self.data_workers, self.cfg.steps)):
                if k not in self._ahead:
                    self._ahead[k] = self._pool.submit(render_batch, *args, k, *more)
            future = self._ahead.pop(step, None)
            images, captions = future.result() if future else render_batch(*args, step, *more)
        else:
            images, captions = render_batch(*args, step, *more)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x0, captions

    def encode(self, captions: list[str]) -> TextConditioning:
        ids = self.tokenizer(captions, padding="max_length", max_length=arch_mod.MAX_TOKENS,
                             truncation=True, return_tensors="pt").input_ids
        out = self.text_encoder(ids.to(self.device))
        return TextConditioning(out.last_hidden_state, out.pooler_output)

    # ---- one step ----------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        x0, captions = self.batch(self.step)
        g = torch.Generator().manual_seed(cfg.seed * 7_000_001 + self.step)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, t, noise = x0.to(self.device), t.to(self.device), noise.to(self.device)
        a = self.alpha[t].view(-1, 1, 1, 1)
        s = self.sigma[t].view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        v_target = a * noise - s * x0
        pred = call_denoiser(self.model, xt, t, self.encode(captions))
        if cfg.min_snr_gamma is None:
            weight = torch.ones_like(self.snr[t])
        else:
            weight = torch.clamp(self.snr[t], max=cfg.min_snr_gamma) / (self.snr[t] + 1)
        loss = (weight * (pred - v_target).square().mean(dim=(1, 2, 3))).mean()
        lr = cfg.learning_rate(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._params().values(), 1.0)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.values()),
                                 [p.detach() for p in self._params().values()], 1 - decay)
        self.step += 1
        return float(loss.detach())

    # ---- checkpoints -------------------------------------------------------
    def save(self) -> None:
        tensors = {k: v.detach() for k, v in self._params().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        tensors.update(adam_tensors(self.opt, self._params().values()))
        write_checkpoint(self.run_dir, tensors, {"step": self.step, "config": asdict(self.cfg),
                                                 "param_names": list(self._params()), "log": self.log})

    def try_resume(self) -> bool:
        meta = read_meta(self.run_dir)
        if meta is None:
            return False
        saved = TrainConfig(**meta["config"])
        if saved != self.cfg and not saved.continues(self.cfg, meta["step"]):
            raise SystemExit(f"{self.run_dir} holds a run with another configuration "
                             f"({meta['config']}); use a new --run-dir")
        tensors = read_tensors(self.run_dir)
        with torch.no_grad():
            for k, p in self._params().items():
                p.copy_(tensors[k])
                self.ema[k].copy_(tensors[f"ema.{k}"])
        load_adam(self.opt, self._params().values(), tensors, self.device)
        self.step = meta["step"]
        self.log = meta["log"]
        return True

    def ema_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v.cpu() for k, v in self.ema.items() if k.startswith(prefix + ".")}

    def close(self) -> None:
        """Stop the data workers (a finished run needs them no more)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool, self._ahead = None, {}

    # ---- loop --------------------------------------------------------------
    def run(self, max_minutes: float | None = None, log_every: int = 50) -> None:
        run_steps(self, self.cfg.steps, self.cfg.checkpoint_every, max_minutes, log_every)


def load_initial_weights(denoiser: torch.nn.Module, text_encoder: torch.nn.Module, arch: str,
                         source: str) -> None:
    """Start from a trained pipeline's denoiser and text encoder (safetensors, in place).

    Every parameter must be there with its shape; buffers whose shape follows the resolution
    (the DiT's sin-cos positional table) keep the new model's own."""
    from ..loading import check_safetensors, resolve
    from .export import DENOISER_FOLDER

    _, folder = resolve(source)
    parts = [(denoiser, folder / DENOISER_FOLDER[arch] / "diffusion_pytorch_model.safetensors"),
             (text_encoder, folder / "text_encoder" / "model.safetensors")]
    for module, path in parts:
        if not path.is_file():
            raise UserError(f"--init-from {source}: {path} is missing; pass a pipeline folder of "
                            f"the same architecture ({arch}), as train-default exports it")
        check_safetensors(path)
        given = load_file(str(path))
        params = dict(module.named_parameters())
        state = module.state_dict()
        wrong = [k for k in params if k not in given or given[k].shape != params[k].shape]
        if wrong:
            raise UserError(f"--init-from {source}: {path} does not fit the {arch} being trained "
                            f"({len(wrong)} parameters missing or of another shape, e.g. {wrong[0]}); "
                            "pass a model of the same architecture")
        keep = {k: v for k, v in given.items() if k in state and v.shape == state[k].shape}
        module.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in keep.items()}})


def train(cfg: TrainConfig, run_dir: Path, max_minutes: float | None = None,
          threads: int | None = None, device: str = "cpu", data_workers: int = 0) -> Trainer:
    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(cfg, run_dir, device=device, data_workers=data_workers)
    if trainer.try_resume():
        print(f"resumed {run_dir} at step {trainer.step}", flush=True)
    try:
        trainer.run(max_minutes)
    finally:
        trainer.close()
    return trainer
