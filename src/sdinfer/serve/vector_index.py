"""The approximate cache's vector index: cosine similarity of normalised prompt embeddings by
inner product in a faiss flat index (exact search; the cache holds thousands of prompts, not
billions), with 64-bit ids, kept in one file written atomically after every change.  A search
can be limited to a set of ids (the entries whose generation settings fit a request)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("the approximate cache needs faiss-cpu; install it with "
                        "`pip install 'sdinfer[serve]'` (or `pip install faiss-cpu`)") from None
    return faiss


class VectorIndex:
    """Exact inner-product search over ``dim``-dimensional vectors with integer ids."""

    def __init__(self, dim: int, path: Path | None = None):
        faiss = _faiss()
        self.dim, self.path = int(dim), path
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @classmethod
    def load(cls, path: Path, dim: int) -> "VectorIndex | None":
        """The index saved at ``path``, or None where there is none or it does not read as an
        index of ``dim`` dimensions (the caller rebuilds it from its own records)."""
        faiss = _faiss()
        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            return None
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            return None
        out = cls(dim, path)
        out.index = index
        return out

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> set[int]:
        return set(int(i) for i in _faiss().vector_to_array(self.index.id_map))

    def add(self, key: int, vector: np.ndarray) -> None:
        v = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        self.index.add_with_ids(v, np.array([key], dtype=np.int64))

    def remove(self, keys: list[int]) -> None:
        if keys:
            self.index.remove_ids(np.array(sorted(keys), dtype=np.int64))

    def nearest(self, vector: np.ndarray, among: list[int]) -> tuple[int, float] | None:
        """The id among ``among`` nearest to ``vector`` and its inner product (cosine similarity
        for normalised vectors); None where none of them is in the index."""
        faiss = _faiss()
        if not among or not len(self):
            return None
        sel = faiss.IDSelectorBatch(np.array(among, dtype=np.int64))
        q = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        sims, ids = self.index.search(q, 1, params=faiss.SearchParameters(sel=sel))
        if ids[0, 0] < 0:
            return None
        return int(ids[0, 0]), float(sims[0, 0])

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        _faiss().write_index(self.index, str(tmp))
        os.replace(tmp, self.path)
