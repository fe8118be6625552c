"""The leader of ``sdinfer serve --ray``: the one owner of what the replicas share.

Each replica (``ray_serve.py``) runs the whole app with its own model, queue and batcher; what
must be one for all of them lives here, in one process, and the replicas reach it by calls:

- the image store (``store.ImageStore``: SQLite and the PNG files in the ``--store`` folder):
  a replica encodes the PNG and sends its bytes (``add_png``); reads return rows and bytes;
- the approximate cache's memory (``approx_memory.ApproxMemory``: the latents, the vector index
  and LCBFU eviction in ``STORE/approx_cache``): every replica's misses insert into it and every
  replica's requests look up in it;
- the job board: the events each replica's jobs publish (``job_event``), so a job created
  through one replica can be followed through another (``job_events``); the last
  ``MAX_JOBS`` jobs are kept.

A plain class (no Ray here): Ray runs it as a named actor (``ray_serve.start_leader``), one
call at a time, in submission order per caller, on the node whose disk holds the store.  The
methods take and return plain data (bytes, dicts, numpy arrays, CPU tensors)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

MAX_JOBS = 1000


class Leader:
    """The shared state of one ``sdinfer serve --ray`` under the store folder ``folder``."""

    def __init__(self, folder, approx_byte_budget: int | None = None, approx_config: dict | None = None):
        from .store import ImageStore

        self.store = ImageStore(folder)
        self.memory = None
        if approx_byte_budget is not None:
            try:
                from .approx_cache import ApproxCacheConfig
                from .approx_memory import ApproxMemory
            except ImportError:    # faiss missing: the replicas serve without the approximate cache
                pass
            else:
                config = ApproxCacheConfig(directory=Path(self.store.folder) / "approx_cache",
                                           byte_budget=int(approx_byte_budget), **(approx_config or {}))
                self.memory = ApproxMemory(config)
        self._jobs: OrderedDict[str, list] = OrderedDict()
        self._jobs_lock = threading.Lock()

    def info(self) -> dict:
        """The store folder, what opening it repaired, its images, whether the cache's memory is here."""
        return {"folder": str(self.store.folder), "repaired": self.store.repaired, "count": self.store.count(),
                "approx_cache": self.memory is not None}

    # ---- the image store ----------------------------------------------------------
    def add_png(self, png: bytes, prompt: str, params: dict, image_id: str | None = None) -> dict:
        stored = self.store.add_png(png, prompt, params, image_id)
        return {"id": stored.id, "created": stored.created, "prompt": stored.prompt, "params": stored.params}

    def read(self, image_id: str) -> bytes | None:
        return self.store.read(image_id)

    def get(self, image_id: str) -> dict | None:
        row = self.store.get(image_id)
        return None if row is None else _row(row)

    def list(self, limit: int = 50, before: str | None = None) -> list[dict]:
        return [_row(r) for r in self.store.list(limit, before)]

    def count(self) -> int:
        return self.store.count()

    # ---- the approximate cache's memory ------------------------------------------
    def _memory(self):
        if self.memory is None:
            raise RuntimeError("the leader holds no approximate cache (faiss-cpu missing where it runs)")
        return self.memory

    def approx_lookup(self, settings: str, embedding, steps: int):
        return self._memory().lookup(settings, embedding, steps)

    def approx_insert(self, prompt: str, settings: str, embedding, kept: dict) -> None:
        self._memory().insert(prompt, settings, embedding, kept)

    def approx_totals(self) -> tuple[int, int]:
        return self._memory().totals()

    # ---- the job board ------------------------------------------------------------
    def job_event(self, job_id: str, event: dict) -> None:
        """One more event of a job (in the order its replica published them)."""
        with self._jobs_lock:
            events = self._jobs.get(job_id)
            if events is None:
                events = self._jobs[job_id] = []
                while len(self._jobs) > MAX_JOBS:
                    self._jobs.popitem(last=False)
            events.append(event)

    def job_events(self, job_id: str, since: int = 0) -> list | None:
        """The job's events from the ``since``-th on; None for a job the board does not hold."""
        with self._jobs_lock:
            events = self._jobs.get(job_id)
            return None if events is None else list(events[since:])

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
        self.store.close()


def _row(stored) -> dict:
    return {"id": stored.id, "created": stored.created, "prompt": stored.prompt, "params": stored.params}
