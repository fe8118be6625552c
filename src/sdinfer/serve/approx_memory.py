"""The memory of NIRVANA's approximate cache (Agarwal et al., "Approximate Caching for Efficiently
Serving Diffusion Models", NSDI 2024): the cached latents (``latent_store.py``), the vector index
of their prompts' embeddings (``vector_index.py``) and LCBFU eviction within the byte budget
(``lcbfu.py``), behind one lock.

``ApproxCache`` (``approx_cache.py``) holds the generation logic and asks its memory two things:
``lookup`` (the nearest compatible cached prompt, the K its similarity allows, and that latent)
and ``insert`` (a generation's latents at the candidate steps it ran).  One process keeps its memory in-process; the
replicas of ``sdinfer serve --ray`` share one, kept by the leader actor (``leader.py``), through
a proxy with these same methods (``shared.RemoteMemory``).  Every method is safe to call from
any thread."""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..errors import UserError
from .latent_store import LatentStore
from .lcbfu import Cached, victims
from .vector_index import VectorIndex


class ApproxMemory:
    """The latents, index and eviction of one cache directory (``ApproxCacheConfig``)."""

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        config.directory.mkdir(parents=True, exist_ok=True)
        self.store = LatentStore(config.directory)
        self.index = self._open_index()
        with self._lock:
            self._evict_over_budget()

    # ---- index -------------------------------------------------------------------
    def _open_index(self) -> VectorIndex | None:
        """The saved index if it holds exactly the store's entries, else rebuilt from the store."""
        rows = self.store.embeddings()
        dim = self.store.meta("dim")
        if dim is None:
            return None          # nothing inserted yet: made at the first insert
        dim = int(dim)
        path = self.config.directory / "index.faiss"
        index = VectorIndex.load(path, dim)
        if index is None or index.ids() != {i for i, _ in rows}:
            index = VectorIndex(dim, path)
            for i, v in rows:
                index.add(i, v)
            index.save()
        return index

    def _ensure_index(self, dim: int) -> VectorIndex:
        if self.index is None:
            self.store.set_meta("dim", str(dim))
            self.index = VectorIndex(dim, self.config.directory / "index.faiss")
        elif self.index.dim != dim:
            raise UserError(f"the approximate cache at {self.config.directory} holds {self.index.dim}-dimensional "
                            f"prompt embeddings and this model's text encoder gives {dim}; use one "
                            "directory per text encoder")
        return self.index

    # ---- public ------------------------------------------------------------------
    def lookup(self, settings: str, embedding: np.ndarray, steps: int):
        """``(similarity, K, latent, source uid)`` of the nearest cached prompt among those of the
        same settings, or None without one.  K is the largest step the similarity allows among
        the latents the entry holds (0: a miss, and latent and uid are None); on a hit the
        latent's use is counted (its LCBFU benefit)."""
        from .approx_cache import choose_step

        with self._lock:
            if self.index is None or self.index.dim != embedding.shape[0]:
                return None
            near = self.index.nearest(embedding, self.store.sources_with(settings))
            if near is None:
                return None
            source, similarity = near
            held = self.store.latents_of(source)
            k = choose_step(similarity, steps, self.config, set(held))
            if k == 0:
                return similarity, 0, None, None
            row = held[k]
            latent = self.store.load(row)
            self.store.used(row)
            return similarity, k, latent, self.store.source_uid(source)

    def insert(self, prompt: str, settings: str, embedding: np.ndarray, kept: dict[int, torch.Tensor]) -> None:
        """A generation's latents (step K -> latent), then eviction within the budget."""
        if not kept:
            return
        with self._lock:
            index = self._ensure_index(embedding.shape[0])
            source, _ = self.store.insert(prompt, settings, embedding, kept)
            index.add(source, embedding)
            self._evict_over_budget()   # saves the index

    def totals(self) -> tuple[int, int]:
        """(bytes, latents) held."""
        with self._lock:
            return self.store.totals()

    def close(self) -> None:
        with self._lock:
            if self.index is not None:
                self.index.save()
            self.store.close()

    # ---- internals ---------------------------------------------------------------
    def _evict_over_budget(self) -> None:
        rows = self.store.all_latents()
        chosen = victims([Cached(r.id, r.step, r.uses, r.id, r.nbytes) for r in rows], self.config.byte_budget)
        gone = self.store.evict([c.key for c in chosen])
        if self.index is not None:
            self.index.remove(gone)
            self.index.save()
