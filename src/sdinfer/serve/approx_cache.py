"""NIRVANA's approximate caching (Agarwal et al., "Approximate Caching for Efficiently Serving
Diffusion Models", NSDI 2024): a serving-level cache of intermediate latents across requests.

The algorithm:
1. Every generation that runs in full keeps its latents at K candidate steps (the paper's
   K = 5, 10, 15, 20, 25 of 50 steps: here the fractions 0.1 ... 0.5 of the step count,
   rounded), keyed by its prompt's text embedding in a vector index on disk
   (``vector_index.py``: faiss, exact cosine search) and by its generation settings (model,
   dtype, size, steps, sampler, grid, final time, analytic first step, guidance scale), with the
   metadata in SQLite (WAL) and each latent in a safetensors file (``latent_store.py``); that
   memory, with the eviction below, is ``approx_memory.py``, in this process or shared by the
   replicas of ``sdinfer serve --ray`` through their leader (``leader.py``).
2. A new request retrieves the nearest cached prompt among those of the same settings
   (another setting is a miss).  Its similarity s chooses K: the largest candidate K whose
   threshold s reaches (the closer the prompts, the more steps skipped) and which the entry
   still holds; below every threshold it is a miss.
3. On a hit the request loads that latent and runs the remaining steps K .. N-1 under its own
   prompt (``Pipeline(..., start=(K, latent))``): K denoiser steps are not run.  The request's
   seed then does not choose the noise (the cached trajectory's did); a stochastic sampler still
   draws its later noise from it.  Multistep samplers restart their history at K.
4. Misses run in full and insert their latents; a hit at K inserts its own latents at the
   candidate steps after K (steps it ran under its own prompt), so a later repeat of a prompt
   that itself resumed can skip more.  The cache holds a byte budget (the latent
   files' bytes); over it, LCBFU (``lcbfu.py``: benefit = K x uses, lowest first, ties oldest
   first) evicts latents, and an entry whose latents are all gone leaves the index.

The prompt embedding is the model's own text encoder's output (``Pipeline.encode``): the mean
of its last hidden states over the prompt's tokens (padding left out; its start and end tokens
in), L2-normalised, so the inner product is the cosine similarity.

Composes with the feature caches of ``sdinfer.accelerate``: a resumed run is a new generation
whose step indices are those of the whole grid (K .. N-1), and the caches keep their state per
generation, so they start clean at K and compute the first step they see.  Samplers that run
their own loop (adaptive DPM-Solver, ParaDiGMS, ParaTAA), ``sampler="auto"``, ``steps="auto"``,
and calibrated grid objects bypass the cache (a plain generation, counted as a miss, nothing
inserted).  ``generate_batch`` serves several requests of the same settings at once: all are
looked up first, then the ones that resume at the same K (the misses: K = 0) run as one
pipeline call, each image from its own seed's noise or its own cached latent.  Thread safety:
generations are serialised; ``stats`` may be called from any thread at any time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..models.tokenizing import tokenizer_lock
from .approx_memory import ApproxMemory
from .latent_store import settings_key

CANDIDATE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)   # the paper's K = 5 .. 25 of 50 steps

# The lowest cosine similarity at which a request skips each fraction of its steps, calibrated on
# the shipped "unet" model (50 steps, ddim, cfg 4; 64 pairs of validation prompts, never held-out
# ones: 50 near-duplicates with one attribute changed, 14 unrelated) by
#   OMP_NUM_THREADS=1 PYTHONPATH=src python bench/approx_cache_thresholds.py --model unet
# (bench/results/approx_cache_thresholds.json): per K the lowest similarity from which up no set of
# the most similar pairs loses more than 2% adherence to the new prompt against full generation.
# K = 5 of 50 held on every pair measured (the lowest similarity, 0.279, unrelated prompts
# included: 54 dB from the full images of the same seed on average), but its threshold is raised to
# 0.6, above every unrelated pair (0.28-0.56) and below most one-attribute changes (0.50-0.97): an
# unrelated prompt misses, as NIRVANA retrieves related prompts' latents, and a request never runs
# on a stranger's noise for a 10% saving; K = 10 and 15 from 0.947 (mostly a changed shape kind);
# K = 20 and 25 lost a moved shape's position at 0.971, so only the same prompt.
DEFAULT_THRESHOLDS = (0.6, 0.9469, 0.9469, 0.9999, 0.9999)


@dataclass
class ApproxCacheConfig:
    """``directory``: where the index, SQLite file and latents live (made if missing);
    ``byte_budget``: the most bytes of latent files kept; ``fractions``: candidate K as
    fractions of the step count; ``thresholds``: per fraction, the lowest similarity that
    skips that many steps (non-decreasing)."""

    directory: Path
    byte_budget: int = 256 * 2**20
    fractions: tuple[float, ...] = CANDIDATE_FRACTIONS
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.fractions, self.thresholds = tuple(self.fractions), tuple(self.thresholds)
        if isinstance(self.byte_budget, bool) or not isinstance(self.byte_budget, int) or self.byte_budget < 0:
            raise UserError(f"byte_budget must be a non-negative integer of bytes, not {self.byte_budget!r}")
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions) or \
                list(self.fractions) != sorted(set(self.fractions)):
            raise UserError(f"fractions {self.fractions} must be increasing, each between 0 and 1 "
                            "(the paper's 0.1, 0.2, 0.3, 0.4, 0.5)")
        if len(self.thresholds) != len(self.fractions):
            raise UserError(f"{len(self.thresholds)} thresholds for {len(self.fractions)} fractions; give "
                            "one similarity per fraction")
        if list(self.thresholds) != sorted(self.thresholds):
            raise UserError(f"thresholds {self.thresholds} must not decrease: skipping more steps needs "
                            "closer prompts")


def candidate_steps(steps: int, fractions) -> list[int]:
    """K for each fraction at this step count (at least 1, below ``steps``; None where a
    rounding gives a K already taken by a smaller fraction)."""
    out, seen = [], set()
    for f in fractions:
        k = int(round(f * steps))
        ok = 1 <= k < steps and k not in seen
        out.append(k if ok else None)
        if ok:
            seen.add(k)
    return out


def choose_step(similarity: float, steps: int, config: ApproxCacheConfig, held: set[int]) -> int:
    """The largest candidate K (held by the entry) whose threshold ``similarity`` reaches; 0 where none."""
    best = 0
    for k, threshold in zip(candidate_steps(steps, config.fractions), config.thresholds):
        if k is not None and k in held and similarity >= threshold:
            best = max(best, k)
    return best


@torch.no_grad()
def prompt_embedding(pipe, prompt: str) -> np.ndarray | None:
    """The prompt's embedding by the model's own text encoder: the mean of its last hidden
    states over the prompt's tokens (padding left out), L2-normalised; None for a model
    without a text encoder."""
    cond = pipe.encode([prompt])
    if cond is None:
        return None
    states = cond.states[0].float()                  # (L, D)
    tok = pipe.model.tokenizer
    count = states.shape[0]
    if tok is not None and pipe.model.text_encoder_2 is None:   # one encoder: its own padding
        text = prompt.lower() if getattr(tok, "do_lower_case", False) else prompt
        with tokenizer_lock(tok):
            ids = tok(text, truncation=True, max_length=states.shape[0]).input_ids
        count = max(1, min(len(ids), states.shape[0]))
    v = states[:count].mean(0)
    v = v / v.norm().clamp_min(1e-12)
    return v.cpu().numpy().astype(np.float32)


def cosine(pipe, a: str, b: str) -> float:
    return float(np.dot(prompt_embedding(pipe, a), prompt_embedding(pipe, b)))


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    steps_saved: int = 0
    bytes: int = 0
    entries: int = 0


_CACHEABLE = {"spacing", "final", "analytic_first_step", "progress"}


class ApproxCache:
    """NIRVANA's approximate cache in front of one ``Pipeline`` (see the module docstring).
    ``memory``: where the latents and the index live (``approx_memory.ApproxMemory``, or a proxy
    with its methods shared by several servers); by default an ``ApproxMemory`` of
    ``config.directory`` in this process."""

    def __init__(self, config: ApproxCacheConfig, pipe, memory=None):
        self.config, self.pipe = config, pipe
        self._lock = threading.Lock()        # the counters
        self._run_lock = threading.Lock()    # one generation at a time
        self._counters = _Counters()
        self.memory = ApproxMemory(config) if memory is None else memory
        self._refresh_totals()

    @property
    def store(self):
        """The latent store of an in-process memory."""
        return self.memory.store

    @property
    def index(self):
        """The vector index of an in-process memory."""
        return self.memory.index

    # ---- public ------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            c = self._counters
            return {"hits": c.hits, "misses": c.misses, "steps_saved": c.steps_saved,
                    "bytes": c.bytes, "entries": c.entries}

    def close(self) -> None:
        with self._run_lock:
            self.memory.close()

    def generate(self, prompt: str, seed: int = 0, steps: int = 50, sampler: str = "ddim",
                 guidance_scale: float = 4.0, size: int | None = None, **kwargs):
        """One image for ``prompt``; returns ``(GenerationResult, info)`` with info ``hit``,
        ``similarity`` (to the nearest compatible cached prompt; None without one), ``skipped_steps``
        and ``source_id`` (the cached entry resumed from)."""
        (result, _, info), = self.generate_batch([prompt], [seed], steps, sampler, guidance_scale, size, **kwargs)
        return result, info

    def generate_batch(self, prompts: list[str], seeds: list[int], steps: int = 50, sampler: str = "ddim",
                       guidance_scale: float = 4.0, size: int | None = None, callback: Callable | None = None,
                       **kwargs) -> list[tuple]:
        """One image per (prompt, seed), with the same settings: every prompt is looked up first,
        then the requests that resume at the same step K run as one pipeline call (the misses,
        K = 0, from their own seeds' noise).  Per request, in order: ``(GenerationResult of its
        call, its index in that result, info)``.  ``callback(i, x, members)``: each call's steps,
        with the indices (into ``prompts``) of the requests in that call."""
        if len(prompts) != len(seeds) or not prompts:
            raise UserError(f"{len(prompts)} prompts and {len(seeds)} seeds: give one seed per prompt")
        run = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, size=size, **kwargs)
        with self._run_lock:
            settings = self._settings(prompts, steps, sampler, guidance_scale, size, kwargs)
            embeddings = [] if settings is None else [prompt_embedding(self.pipe, p) for p in prompts]
            if settings is None or any(e is None for e in embeddings):
                everyone = list(range(len(prompts)))
                step = None if callback is None else (lambda i, x: callback(i, x, everyone))
                result = self.pipe(list(prompts), seeds=list(seeds), callback=step, **run)
                out = [(result, b, self._count(False, None, 0, None)) for b in range(len(prompts))]
                self._refresh_totals()
                return out
            found = [self.memory.lookup(settings, e, steps) for e in embeddings]
            groups: dict[int, list[int]] = {}
            for i, f in enumerate(found):
                groups.setdefault(f[1] if f is not None else 0, []).append(i)
            out: list = [None] * len(prompts)
            for k, members in groups.items():
                result, kept = self._run_group(k, members, prompts, seeds, found, steps, run, callback)
                for b, i in enumerate(members):
                    if kept[b]:
                        self.memory.insert(prompts[i], settings, embeddings[i], kept[b])
                    similarity = None if found[i] is None else found[i][0]
                    out[i] = (result, b, self._count(k > 0, similarity, k, found[i][3] if k else None))
            self._refresh_totals()
            return out

    # ---- internals ---------------------------------------------------------------
    def _settings(self, prompts, steps, sampler, guidance_scale, size, kwargs) -> str | None:
        """The settings key of cacheable requests, or None where they bypass the cache."""
        from ..samplers import get_sampler
        from ..samplers.base import steps_one_by_one

        if not all(isinstance(p, str) for p in prompts) or set(kwargs) - _CACHEABLE:
            return None
        if isinstance(steps, bool) or not isinstance(steps, int) or not isinstance(sampler, str) or sampler == "auto":
            return None
        spacing = kwargs.get("spacing")
        if spacing is not None and not isinstance(spacing, str):
            return None
        try:
            solver = get_sampler(sampler)
        except (ValueError, KeyError):
            return None          # the pipeline's own error reaches the caller
        if not steps_one_by_one(solver) or not getattr(solver, "resumable", True):
            return None
        m = self.pipe.model
        return settings_key({
            "model": str(m.path) if getattr(m, "path", None) else m.name, "dtype": str(m.dtype),
            "size": self.pipe.check_size(size), "steps": steps, "sampler": sampler,
            "spacing": spacing, "final": kwargs.get("final", "zero"),
            "analytic_first_step": bool(kwargs.get("analytic_first_step", False)),
            "guidance_scale": float(guidance_scale)})

    def _run_group(self, k: int, members: list[int], prompts, seeds, found, steps: int, run: dict, callback):
        """One pipeline call for the requests that resume at step ``k`` (0: from their noise),
        keeping each image's latents at the candidate steps after ``k`` (its own steps, under its
        own prompt: a later request for a prompt that itself resumed may skip more)."""
        wanted = {c for c in candidate_steps(steps, self.config.fractions) if c is not None and c > k}
        kept: list[dict[int, torch.Tensor]] = [{} for _ in members]

        def keep(i, x):
            if i + 1 in wanted:
                for b in range(len(members)):
                    kept[b][i + 1] = x[b].detach().to("cpu", torch.float32).clone()
            if callback is not None:
                callback(i, x, members)

        extra = {}
        if k:
            extra["start"] = (k, torch.stack([found[i][2].reshape(found[i][2].shape[-3:]) for i in members]))
        result = self.pipe([prompts[i] for i in members], seeds=[seeds[i] for i in members], callback=keep,
                           **run, **extra)
        return result, kept

    def _refresh_totals(self) -> None:
        totals = self.memory.totals()
        with self._lock:
            self._counters.bytes, self._counters.entries = totals

    def _count(self, hit: bool, similarity, k: int, uid) -> dict:
        with self._lock:
            if hit:
                self._counters.hits += 1
                self._counters.steps_saved += k
            else:
                self._counters.misses += 1
        return {"hit": hit, "similarity": similarity, "skipped_steps": k, "source_id": uid}
