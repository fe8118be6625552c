"""One lock per tokenizer object: a Hugging Face fast tokenizer is not safe to call from two
threads at once (each call sets the Rust tokenizer's padding and truncation, so a padded batch
beside an unpadded single call can fail with "Unable to create tensor ... padding=True").  A
server checks a request's words on its event loop while its worker encodes a batch, so every
use of a pipeline's tokenizers holds this lock."""

from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def tokenizer_lock(tokenizer):
    """The re-entrant lock of ``tokenizer`` (a no-op context for None)."""
    if tokenizer is None:
        return nullcontext()
    with _guard:
        lock = _locks.get(tokenizer)
        if lock is None:
            lock = _locks[tokenizer] = threading.RLock()
        return lock
