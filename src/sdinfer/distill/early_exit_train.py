"""Training of an early-exit model (ASE, Moon et al. ICML 2024; ``early_exit.py``): the schedule
from measurement, then a brief fine-tuning of the whole denoiser by distillation.

Schedule (``derive_schedule``): for each of ``buckets`` equal buckets of s = t / 1000 and each k, a
few short generations (DDIM 20, guidance 4, training captions) skip the first k units in that
bucket only, and their final images are compared with the unmodified model's: err[b, k] =
||x_k - x||^2 / ||x||^2 (``skip_errors``; end to end, as the sampler weighs the steps).  Starting from k = 0 everywhere, the bucket whose next unit costs the least
error per MAC saved takes it, until the mean fraction of the units' MACs saved reaches ``budget``
(at most ``max_skip`` units per bucket).

Fine-tuning (the paper's recipe, as a distillation): a copy of the unmodified model is the teacher.
Each step draws a shapes batch (``models/default/train.render_batch``, seeded by (seed, step), the
captions dropped with probability ``caption_dropout`` as the guidance's unconditional branch needs),
timesteps t uniform over the 1000 training steps and noise from a generator seeded by (seed, step);
the student runs each sample truncated as the schedule says at its t (samples grouped by their k)
and the loss is the mean squared error against the teacher's output on the same x_t:

    L = E_t || f_student^{k(t)}(x_t, t, c) - f_teacher(x_t, t, c) ||^2
        + full_weight * E_t || f_student^{0}(x_t, t, c) - f_teacher(x_t, t, c) ||^2

The first term covers every t (at those where k(t) = 0 the student's full network is the one
used); the second, optional, keeps the full network close where the schedule truncates it too.
Adam with a linear warm-up and a cosine decay, gradients clipped to norm 1.  Checkpoints are
safetensors (weights and Adam moments) plus a JSON file; a repeated command resumes from them and
sees exactly the batches an uninterrupted run would.  Nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache.base import CacheHandle
from ..errors import UserError
from ..models.calling import call_denoiser
from ..models.default import shapes
from ..models.default.checkpoint import adam_tensors, load_adam, read_meta, read_tensors, run_steps, write_checkpoint
from ..models.default.train import render_batch
from .early_exit import ExitControl, ExitSchedule, install_skips, save_weights, skip_units

NUM_TIMESTEPS = 1000


@dataclass
class EarlyExitTrainConfig:
    model: str = "dit"
    schedule: str = ""          # K0/K1/...; empty: derived by measurement under ``budget``
    budget: float = 0.3         # mean fraction of the units' MACs saved
    buckets: int = 10
    max_skip: int = -1          # at most this many units per bucket; -1: all but one
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 20
    full_weight: float = 0.0
    caption_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 50
    measure_batch: int = 8

    def learning_rate(self, step: int) -> float:
        lr = self.lr * min(1.0, (step + 1) / max(self.warmup, 1))
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(self.steps, 1))))


# ---- data -------------------------------------------------------------------------------------
class Batches:
    """Seeded shapes batches noised at seeded timesteps, encoded by the pipeline's text encoder."""

    def __init__(self, pipe, seed: int, batch_size: int, caption_dropout: float):
        self.pipe, self.seed, self.batch_size, self.dropout = pipe, seed, batch_size, caption_dropout
        self.heldout = frozenset(shapes.heldout_prompts())
        ac = pipe.model.schedule.alphas_cumprod.float()
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        self.size = int(pipe.model.native_size)

    def draw(self, step: int, t_range: tuple[float, float] = (0.0, 1.0), batch: int | None = None):
        """(x_t, t, text) of step ``step``: t uniform over the timesteps in ``t_range`` (s units)."""
        batch = batch or self.batch_size
        images, captions = render_batch(self.seed, batch, self.dropout, step, self.heldout, self.size)
        x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        g = torch.Generator().manual_seed(self.seed * 7_000_001 + step)
        low, high = int(t_range[0] * NUM_TIMESTEPS), max(int(t_range[1] * NUM_TIMESTEPS), int(t_range[0] * NUM_TIMESTEPS) + 1)
        t = torch.randint(low, min(high, NUM_TIMESTEPS), (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = self.alpha[t].view(-1, 1, 1, 1) * x0 + self.sigma[t].view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            text = self.pipe.encode(list(captions))
        return xt, t, text


def _subset(text, index: torch.Tensor):
    from ..models.calling import TextConditioning
    return TextConditioning(text.states[index], None if text.pooled is None else text.pooled[index])


# ---- the schedule from measurement -------------------------------------------------------------
def unit_macs(net: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, text) -> list[float]:
    """The MACs of each skippable unit on one call (torch's FLOP counter, by module)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = [n for n, _ in skip_units(net)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_denoiser(net, xt, t, text)
    counts = counter.get_flop_counts()
    prefix = type(net).__name__
    return [sum(counts.get(f"{prefix}.{n}", {}).values()) / 2 for n in names]


def skip_errors(pipe, batches: Batches, buckets: int, max_skip: int, steps: int = 20,
                guidance_scale: float = 4.0) -> np.ndarray:
    """err[b, k]: the relative squared error of the *final images* of short generations (DDIM
    ``steps``, guidance ``guidance_scale``, ``batches.measure_batch`` training captions and seeds)
    when only the calls in bucket b skip k units, against the unmodified generations.

    End to end rather than per call: the error of one call's output misranks the noise levels (a
    v-prediction's relative error is alike across t, while the sampler forgets an early step's
    error and keeps a late one's: on the default DiT skipping 2 of 4 blocks for s >= 0.7 left
    adherence as it was, for s <= 0.3 it fell from 0.80 to 0.03)."""
    net = pipe.model.denoiser
    _, captions = render_batch(batches.seed + 10**6, batches_measure(batches), 0.0, 0, batches.heldout, batches.size)
    seeds = list(range(len(captions)))
    control = ExitControl(ExitSchedule((0,)))
    handle = CacheHandle("early-exit-measure")
    install_skips(net, control, handle)

    def images(counts: tuple[int, ...]) -> torch.Tensor:
        control.schedule = ExitSchedule(counts)
        return pipe(list(captions), steps=steps, sampler="ddim", guidance_scale=guidance_scale, seeds=seeds).pixels

    errors = np.zeros((buckets, max_skip + 1))
    try:
        with torch.no_grad():
            full = images((0,) * buckets)
            for b in range(buckets):
                for k in range(1, max_skip + 1):
                    counts = tuple(k if i == b else 0 for i in range(buckets))
                    errors[b, k] = float((images(counts) - full).square().mean() / full.square().mean().clamp(min=1e-12))
    finally:
        handle.remove()
    return errors


def batches_measure(batches: Batches) -> int:
    return getattr(batches, "measure_batch", batches.batch_size)


def derive_schedule(errors: np.ndarray, costs: list[float], budget: float) -> ExitSchedule:
    """Greedy: raise k where the next unit's error per MAC saved is least, until ``budget`` is met."""
    buckets, top = errors.shape[0], errors.shape[1] - 1
    counts = [0] * buckets
    schedule = ExitSchedule(tuple(counts))
    while schedule.saved_fraction(costs) < budget:
        options = [((errors[b, counts[b] + 1] - errors[b, counts[b]]) / max(costs[counts[b]], 1e-12), b)
                   for b in range(buckets) if counts[b] < top]
        if not options:
            break
        counts[min(options)[1]] += 1
        schedule = ExitSchedule(tuple(counts))
    return schedule


# ---- training ----------------------------------------------------------------------------------
class EarlyExitTrainer:
    def __init__(self, cfg: EarlyExitTrainConfig, run_dir: Path, pipe=None):
        from ..pipeline import Pipeline

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.pipe = pipe or Pipeline.from_pretrained(cfg.model)
        self.net = self.pipe.model.denoiser
        self.net.requires_grad_(False)
        if self.pipe.model.text_encoder is not None:
            self.pipe.model.text_encoder.requires_grad_(False)
        self.teacher = copy.deepcopy(self.net).eval()
        self.batches = Batches(self.pipe, cfg.seed, cfg.batch_size, cfg.caption_dropout)
        self.batches.measure_batch = cfg.measure_batch
        self.units = [n for n, _ in skip_units(self.net)]
        self.step = 0
        self.log: list[dict] = []
        self.schedule_info: dict = {}
        self.schedule: ExitSchedule | None = ExitSchedule.parse(cfg.schedule) if cfg.schedule else None
        self.params = [p for p in self.net.parameters()]
        self.names = [n for n, _ in self.net.named_parameters()]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)

    # ---- schedule ----
    def measure(self) -> None:
        cfg = self.cfg
        xt, t, text = self.batches.draw(10**6 + 999, batch=1)
        costs = unit_macs(self.net, xt, t, text)
        top = len(self.units) - 1 if cfg.max_skip < 0 else min(cfg.max_skip, len(self.units))
        self.schedule_info = {"unit_macs": costs}
        if self.schedule is None:   # a given schedule needs no measurement of the errors
            errors = skip_errors(self.pipe, self.batches, cfg.buckets, top)
            self.schedule = derive_schedule(errors, costs, cfg.budget)
            self.schedule_info["errors"] = errors.round(5).tolist()
        self.schedule.check(len(self.units))
        self.schedule_info["saved_fraction"] = round(self.schedule.saved_fraction(costs), 4)
        print(json.dumps({"schedule": self.schedule.text(), **self.schedule_info}), flush=True)

    # ---- one step ----
    def train_step(self) -> float:
        cfg = self.cfg
        xt, t, text = self.batches.draw(self.step)
        with torch.no_grad():
            target = call_denoiser(self.teacher, xt, t, text)
        ks = torch.tensor([self.schedule.skipped(float(s) / NUM_TIMESTEPS) for s in t])
        self.net.requires_grad_(True)
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        groups = [(int(k), (ks == k).nonzero().flatten()) for k in ks.unique()]
        if cfg.full_weight > 0:
            groups.append((0, torch.arange(len(t))))
        for index, (k, rows) in enumerate(groups):
            weight = cfg.full_weight if index == len(groups) - 1 and cfg.full_weight > 0 else 1.0
            self.control.forced = k
            out = call_denoiser(self.net, xt[rows], t[rows], _subset(text, rows))
            loss = weight * (out - target[rows]).square().mean(dim=(1, 2, 3)).sum() / len(t)
            loss.backward()
            total += float(loss.detach())
        self.control.forced = None
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        for group in self.opt.param_groups:
            group["lr"] = cfg.learning_rate(self.step)
        self.opt.step()
        self.net.requires_grad_(False)
        self.net.eval()
        self.step += 1
        return total

    # ---- checkpoints ----
    def save(self) -> None:
        tensors = {f"model.{n}": p.detach() for n, p in zip(self.names, self.params)}
        tensors.update(adam_tensors(self.opt, self.params))
        write_checkpoint(self.run_dir, tensors, {"step": self.step, "config": asdict(self.cfg),
                                                 "schedule": self.schedule.text(),
                                                 "schedule_info": self.schedule_info, "log": self.log})

    def try_resume(self) -> bool:
        meta = read_meta(self.run_dir)
        if meta is None:
            return False
        saved = dict(meta["config"])
        mine = asdict(self.cfg)
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in mine.items() if k != "steps"}:
            raise UserError(f"{self.run_dir} holds an early-exit run with another configuration ({meta['config']}); "
                            "repeat that command to resume it, or pass a new --run-dir")
        tensors = read_tensors(self.run_dir)
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[f"model.{n}"])
        load_adam(self.opt, self.params, tensors)
        self.step, self.log = meta["step"], meta["log"]
        self.schedule, self.schedule_info = ExitSchedule.parse(meta["schedule"]), meta["schedule_info"]
        return True

    # ---- loop ----
    def run(self, max_minutes: float | None = None, log_every: int = 10, stop_at: int | None = None) -> None:
        """Train to ``cfg.steps`` (resuming a checkpoint), stopping resumably after ``max_minutes``
        or at step ``stop_at``."""
        if not self.try_resume():
            self.measure()
            self.save()
        else:
            print(f"resumed {self.run_dir} at step {self.step}", flush=True)
        self.control = ExitControl(self.schedule)
        handle = CacheHandle("early-exit-train")
        install_skips(self.net, self.control, handle)
        try:
            run_steps(self, min(self.cfg.steps, stop_at or self.cfg.steps), self.cfg.checkpoint_every, max_minutes,
                      log_every)
        finally:
            handle.remove()

    def export(self, file: Path) -> Path:
        train = {**asdict(self.cfg), "steps": self.step, **self.schedule_info}
        return save_weights(file, self.net, self.schedule, train)


def train(cfg: EarlyExitTrainConfig, run_dir: Path, max_minutes: float | None = None,
          threads: int | None = None, pipe=None, stop_at: int | None = None) -> EarlyExitTrainer:
    if threads:
        torch.set_num_threads(threads)
    trainer = EarlyExitTrainer(cfg, run_dir, pipe)
    trainer.run(max_minutes, stop_at=stop_at)
    return trainer
