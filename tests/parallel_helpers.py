"""Shared by the parallel test workers (run as scripts: this folder is on their path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def run_workers(worker: Path, mode: str | None, out: Path, ranks: int = 2) -> dict:
    """The pytest side: ``worker`` (with ``mode``) on ``ranks`` local ranks, each exiting 0;
    what rank 0 wrote to ``out``."""
    from sdinfer.parallel.launch import launch_local

    args = [sys.executable, str(worker), *([mode] if mode else []), str(out)]
    assert launch_local(args, ranks) == [0] * ranks
    return json.loads(Path(out).read_text())
