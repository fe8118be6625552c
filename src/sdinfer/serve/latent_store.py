"""The approximate cache's store: SQLite (WAL) for the metadata, one safetensors file per latent.

Tables: ``sources`` (one per cached generation: a uid, the prompt, its generation settings as a
canonical JSON key, the prompt embedding as float32 bytes; the embedding is kept here too so the
vector index can always be rebuilt from this file, the one source of truth) and ``latents`` (one
per cached intermediate latent: its source, the step K it was taken after, file name, bytes,
uses; its autoincrement id is the insertion order).  A latent's file is written (to a temporary
name, then renamed) before its row is committed; at open, files without a row (a crash between
the two) are deleted and rows whose file is gone are dropped, with their source when it has no
latent left.  Not thread-safe by itself: the cache serialises calls."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class LatentRow:
    id: int
    source: int
    step: int
    file: str
    nbytes: int
    uses: int


class LatentStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = self.directory / "latents"
        self.files.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.directory / "approx_cache.sqlite3", check_same_thread=False,
                                  isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("""CREATE TABLE IF NOT EXISTS sources (
                id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT UNIQUE NOT NULL, prompt TEXT NOT NULL,
                settings TEXT NOT NULL, embedding BLOB NOT NULL, created REAL NOT NULL)""")
            self.db.execute("CREATE INDEX IF NOT EXISTS sources_settings ON sources(settings)")
            self.db.execute("""CREATE TABLE IF NOT EXISTS latents (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                source INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
                step INTEGER NOT NULL, file TEXT NOT NULL, nbytes INTEGER NOT NULL,
                uses INTEGER NOT NULL DEFAULT 1, UNIQUE(source, step))""")
            version = self.meta("schema")
            if version is None:
                self.set_meta("schema", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise UserError(f"the approximate cache at {self.directory} has schema {version}, this sdinfer "
                                f"reads {SCHEMA_VERSION}; use another directory or delete this one")
        self._repair()

    # ---- plumbing ----------------------------------------------------------------
    def transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                store.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return _Tx()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _repair(self) -> None:
        """Make files and rows agree after a crash (see the module docstring)."""
        rows = self.db.execute("SELECT id, file FROM latents").fetchall()
        known = {f for _, f in rows}
        for path in self.files.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
        missing = [i for i, f in rows if not (self.files / f).is_file()]
        with self.transaction():
            for i in missing:
                self.db.execute("DELETE FROM latents WHERE id = ?", (i,))
            self.db.execute("DELETE FROM sources WHERE id NOT IN (SELECT source FROM latents)")

    def close(self) -> None:
        self.db.close()

    # ---- reads -------------------------------------------------------------------
    def embeddings(self) -> list[tuple[int, np.ndarray]]:
        return [(i, np.frombuffer(b, dtype=np.float32)) for i, b in
                self.db.execute("SELECT id, embedding FROM sources ORDER BY id")]

    def sources_with(self, settings: str) -> list[int]:
        return [i for (i,) in self.db.execute("SELECT id FROM sources WHERE settings = ?", (settings,))]

    def source_uid(self, source: int) -> str:
        return self.db.execute("SELECT uid FROM sources WHERE id = ?", (source,)).fetchone()[0]

    def latents_of(self, source: int) -> dict[int, LatentRow]:
        return {r.step: r for r in self._rows("WHERE source = ?", (source,))}

    def all_latents(self) -> list[LatentRow]:
        return self._rows("", ())

    def _rows(self, where: str, args: tuple) -> list[LatentRow]:
        q = f"SELECT id, source, step, file, nbytes, uses FROM latents {where} ORDER BY id"
        return [LatentRow(*r) for r in self.db.execute(q, args)]

    def totals(self) -> tuple[int, int]:
        """(bytes, latents) held."""
        n, b = self.db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM latents").fetchone()
        return int(b), int(n)

    def load(self, row: LatentRow) -> torch.Tensor:
        try:
            return load_file(str(self.files / row.file))["latent"]
        except Exception as err:   # a damaged file: say which, and how to recover
            raise UserError(f"cached latent {self.files / row.file} cannot be read ({err}); delete it "
                            "(the cache drops its row when it reopens)") from None

    # ---- writes ------------------------------------------------------------------
    def insert(self, prompt: str, settings: str, embedding: np.ndarray,
               latents: dict[int, torch.Tensor]) -> tuple[int, str]:
        """A generation's latents (step K -> latent) under a new source; returns (id, uid)."""
        uid = uuid.uuid4().hex
        written = []
        try:
            for k, x in sorted(latents.items()):
                name = f"{uid}-k{k}.safetensors"
                tmp = self.files / (name + ".tmp")
                save_file({"latent": x.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                          metadata={"prompt": prompt, "step": str(k), "settings": settings})
                os.replace(tmp, self.files / name)
                written.append((k, name, (self.files / name).stat().st_size))
            with self.transaction():
                cur = self.db.execute("INSERT INTO sources (uid, prompt, settings, embedding, created) "
                                      "VALUES (?, ?, ?, ?, ?)",
                                      (uid, prompt, settings, np.asarray(embedding, np.float32).tobytes(),
                                       time.time()))
                source = cur.lastrowid
                self.db.executemany("INSERT INTO latents (source, step, file, nbytes) VALUES (?, ?, ?, ?)",
                                    [(source, k, name, n) for k, name, n in written])
        except BaseException:
            for _, name, _ in written:
                (self.files / name).unlink(missing_ok=True)
            raise
        return source, uid

    def used(self, row: LatentRow) -> None:
        self.db.execute("UPDATE latents SET uses = uses + 1 WHERE id = ?", (row.id,))

    def evict(self, ids: list[int]) -> list[int]:
        """Delete these latents (rows, then files); returns the sources left without a latent,
        which are deleted too."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        files = [f for (f,) in self.db.execute(f"SELECT file FROM latents WHERE id IN ({marks})", ids)]
        with self.transaction():
            self.db.execute(f"DELETE FROM latents WHERE id IN ({marks})", ids)
            empty = [i for (i,) in self.db.execute(
                "SELECT id FROM sources WHERE id NOT IN (SELECT source FROM latents)")]
            self.db.executemany("DELETE FROM sources WHERE id = ?", [(i,) for i in empty])
        for f in files:
            (self.files / f).unlink(missing_ok=True)
        return empty


def settings_key(settings: dict) -> str:
    """The canonical JSON of a generation's settings: equal strings, compatible generations."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))
