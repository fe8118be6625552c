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
4. Misses run in full and insert their latents.  The cache holds a byte budget (the latent
   files' bytes); over it, LCBFU (``lcbfu.py``: benefit = K x uses, lowest first, ties oldest
   first) evicts latents, and an entry whose latents are all gone leaves the index.

The prompt embedding is the model's own text encoder's output (``Pipeline.encode``): the mean
of its last hidden states over the prompt's tokens (padding left out; its start and end tokens
in), L2-normalised, so the inner product is the cosine similarity.

Composes with the feature caches of ``sdinfer.accelerate``: a resumed run is a new generation
whose step indices are those of the whole grid (K .. N-1), and the caches keep their state per
generation, so they start clean at K and compute the first step they see.  Samplers that run
their own loop (adaptive DPM-Solver, ParaDiGMS, ParaTAA), ``sampler="auto"``, ``steps="auto"``,
calibrated grid objects and batches of prompts bypass the cache (a plain generation, counted as
a miss, nothing inserted).  Thread safety: ``generate`` calls are serialised; ``stats`` may be
called from any thread at any time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
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


_CACHEABLE = {"spacing", "final", "analytic_first_step", "callback", "progress"}


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
        run = dict(prompts=prompt, seed=seed, steps=steps, sampler=sampler,
                   guidance_scale=guidance_scale, size=size, **kwargs)
        with self._run_lock:
            settings = self._settings(prompt, steps, sampler, guidance_scale, size, kwargs)
            embedding = None if settings is None else prompt_embedding(self.pipe, prompt)
            if embedding is None:
                result = self.pipe(**run)
                return result, self._count(False, None, 0, None)
            found = self.memory.lookup(settings, embedding, steps)
            if found is not None and found[1] > 0:
                return self._resume(run, found)
            similarity = None if found is None else found[0]
            return self._full(run, prompt, settings, embedding, steps, similarity)

    # ---- internals ---------------------------------------------------------------
    def _settings(self, prompt, steps, sampler, guidance_scale, size, kwargs) -> str | None:
        """The settings key of a cacheable request, or None where it bypasses the cache."""
        from ..samplers import get_sampler
        from ..samplers.base import steps_one_by_one

        if not isinstance(prompt, str) or set(kwargs) - _CACHEABLE:
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

    def _resume(self, run: dict, found):
        similarity, k, latent, uid = found
        result = self.pipe(**run, start=(k, latent))
        result.params["approx_cache"] = {"source_id": uid, "skipped_steps": k}
        return result, self._count(True, similarity, k, uid)

    def _full(self, run: dict, prompt: str, settings: str, embedding: np.ndarray, steps: int,
              similarity: float | None):
        wanted = {k for k in candidate_steps(steps, self.config.fractions) if k is not None}
        kept: dict[int, torch.Tensor] = {}
        user_callback: Callable | None = run.pop("callback", None)

        def keep(i, x):
            if i + 1 in wanted:
                kept[i + 1] = x[0].detach().to("cpu", torch.float32).clone()
            if user_callback is not None:
                user_callback(i, x)

        result = self.pipe(**run, callback=keep)
        if kept:
            self.memory.insert(prompt, settings, embedding, kept)
        return result, self._count(False, similarity, 0, None)

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
        self._refresh_totals()
        return {"hit": hit, "similarity": similarity, "skipped_steps": k, "source_id": uid}
