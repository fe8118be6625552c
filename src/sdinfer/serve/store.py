"""The image store: every generated image as a PNG file and a row of its parameters in SQLite.

Layout under the store folder: ``images.sqlite3`` (WAL journal) and ``images/ID.png``.  A write
is atomic: the PNG goes to a temporary file in ``images/`` (``ID.png.tmp-...``), is fsynced and
renamed into place, the folder is fsynced, and only then is the row inserted (one transaction).
A process killed at any point leaves at most a temporary file, or a PNG without its row; opening
the store removes both, and any row whose file is gone, so every row it lists has its image and
every image its row.  Ids are 32 lowercase hex digits (``uuid4().hex``), checked before any
path is made from one: a request never names a file."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
TMP_MARK = ".tmp-"
SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL
)"""


def default_store_dir() -> Path:
    """``$XDG_CACHE_HOME/sdinfer/serve`` (``~/.cache/sdinfer/serve``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdinfer" / "serve"


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(image_id: str) -> bool:
    return bool(ID_PATTERN.match(image_id))


@dataclass
class StoredImage:
    id: str
    created: float
    prompt: str
    params: dict
    png: bytes | None = field(default=None, repr=False)   # the file's bytes, where just written

    def as_dict(self) -> dict:
        return {"id": self.id, "created": self.created, "prompt": self.prompt, **self.params}


class ImageStore:
    """One folder of images; safe to share between threads (one connection behind a lock)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.images = self.folder / "images"
        try:
            self.images.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.folder / "images.sqlite3", check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise UserError(f"cannot open the image store in {self.folder}: {err}; choose another "
                            "--store folder") from None
        self._lock = threading.Lock()
        self.repaired = self._repair()

    # ---- opening ------------------------------------------------------------------
    def _repair(self) -> dict:
        """Remove what an interrupted write left: temporary files, PNGs without a row, rows
        without a PNG.  Returns how many of each."""
        removed = {"temporary": 0, "unlisted": 0, "missing": 0}
        with self._lock:
            ids = {row[0] for row in self._db.execute("SELECT id FROM images")}
            for path in self.images.iterdir():
                if TMP_MARK in path.name:
                    path.unlink(missing_ok=True)
                    removed["temporary"] += 1
                elif path.suffix == ".png" and path.stem not in ids:
                    path.unlink(missing_ok=True)
                    removed["unlisted"] += 1
            gone = [i for i in ids if not (self.images / f"{i}.png").is_file()]
            if gone:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in gone])
                self._db.execute("COMMIT")
            removed["missing"] = len(gone)
        return removed

    # ---- writing ------------------------------------------------------------------
    def add(self, image, prompt: str, params: dict, image_id: str | None = None,
            metadata: dict | None = None) -> StoredImage:
        """Store a PIL image with its parameters (JSON-able); ``metadata`` goes into the PNG's
        text chunks.  The file is durable on disk before its row exists."""
        return self.add_png(encode_png(image, metadata), prompt, params, image_id)

    def add_png(self, png: bytes, prompt: str, params: dict, image_id: str | None = None) -> StoredImage:
        """Store a PNG's bytes (``encode_png``) with its parameters, atomically (the module docstring)."""
        image_id = image_id or new_id()
        if not valid_id(image_id):
            raise ValueError(f"image id {image_id!r} is not 32 hex digits")
        final = self.images / f"{image_id}.png"
        tmp = self.images / f"{image_id}.png{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(png)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.images)
        created = time.time()
        try:
            with self._lock:
                self._db.execute("INSERT INTO images (id, created, prompt, params) VALUES (?, ?, ?, ?)",
                                 (image_id, created, prompt, json.dumps(params)))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return StoredImage(image_id, created, prompt, params, png)

    # ---- reading ------------------------------------------------------------------
    def path(self, image_id: str) -> Path | None:
        """The PNG of a stored image; None for a malformed or unknown id."""
        if not valid_id(image_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
        path = self.images / f"{image_id}.png"
        return path if row is not None and path.is_file() else None

    def read(self, image_id: str) -> bytes | None:
        """The PNG's bytes of a stored image; None for a malformed or unknown id."""
        path = self.path(image_id)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def get(self, image_id: str) -> StoredImage | None:
        if not valid_id(image_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT id, created, prompt, params FROM images WHERE id = ?",
                                   (image_id,)).fetchone()
        return None if row is None else StoredImage(row[0], row[1], row[2], json.loads(row[3]))

    def list(self, limit: int = 50, before: str | None = None) -> list[StoredImage]:
        """Newest first; ``before``: an image id, to list the ones stored before it."""
        with self._lock:
            if before is None:
                rows = self._db.execute("SELECT id, created, prompt, params FROM images "
                                        "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT id, created, prompt, params FROM images WHERE seq < "
                    "(SELECT seq FROM images WHERE id = ?) ORDER BY seq DESC LIMIT ?",
                    (before, limit)).fetchall()
        return [StoredImage(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def encode_png(image, metadata: dict | None = None) -> bytes:
    """A PIL image as PNG bytes, ``metadata`` in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
