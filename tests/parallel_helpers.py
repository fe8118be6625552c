"""Shared by the parallel test workers (run as scripts: this folder is on their path)."""

from __future__ import annotations

import json

import torch.distributed as dist

from sdinfer.errors import UserError
from sdinfer.parallel import apply


def error_of(fn) -> str | None:
    """The message of the UserError ``fn()`` raises, or None."""
    try:
        fn()
    except UserError as err:
        return str(err)
    return None


def under(target, spec, fn):
    """``(fn(), handle)`` with strategy ``spec`` on ``target``, removed afterwards."""
    handle = apply(target, spec)
    try:
        return fn(), handle
    finally:
        handle.remove()


def write_findings(found: dict, path: str) -> None:
    """Rank 0 writes what the ranks found, for the pytest side to judge."""
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(found, f, indent=1)
