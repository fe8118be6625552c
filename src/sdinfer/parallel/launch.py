"""Launching ranks and keeping a failure from hanging the others.

Two ways to start N ranks, which look the same to a rank:

- ``torchrun --nproc-per-node N -m sdinfer generate ... --parallel SPEC`` (which also spans
  machines): the rank reads RANK / WORLD_SIZE / LOCAL_RANK and joins through env://.
- ``sdinfer generate ... --parallel SPEC --world-size N``: ``launch_local`` hosts a TCPStore on
  a free port (no port race), starts N copies of the command with the same variables plus
  ``SDINFER_STORE`` (the store's address), and watches them.

Failure (a rank raises, or is killed): the ranks still running are blocked in a collective
with it or will enter one; gloo fails that collective within about a second of the peer's
sockets closing ("Connection closed by peer"), and any collective fails after the process
group's timeout (``DEFAULT_TIMEOUT_S``) if a peer stops answering without dying.
``run_rank`` turns that into one line naming the failed rank and a non-zero exit.  The rank
that failed leaves a note in the launcher's store ("rank 1 failed: RuntimeError: ..."); the
launcher, which sees every exit, writes one for a rank that died without a word ("rank 1 was
killed by SIGKILL") and stops the ranks that did not stop on their own within ``grace_s``
(SIGTERM, then SIGKILL); each stopping rank prints "rank 0 stopped because <note>".  A failure
that every rank meets alike (a strategy the model does not take) is printed once: the first
rank's note wins atomically, a rank whose failure reads the same stays quiet, and the launcher
adds nothing to a rank's refusal of its input (exit code 2).  Under torchrun its agent does
the watching and names the failed rank in its summary.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import UserError
from .comm import PeerFailure

DEFAULT_TIMEOUT_S = 120.0   # a collective waits this long for a live but silent peer
STORE_ENV = "SDINFER_STORE"
FAILURE_KEY = "sdinfer/failure"
KNOWN_BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")
_store: dist.TCPStore | None = None   # this rank's client of the launcher's store


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    store: str | None = None   # host:port of sdinfer's launcher store; None under torchrun

    @classmethod
    def from_env(cls) -> "RankInfo | None":
        """This process's place among the ranks, or None when no launcher started it."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise UserError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                            "whole numbers (set by torchrun or sdinfer's --world-size)") from None
        if not 0 <= rank < world:
            raise UserError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local, os.environ.get(STORE_ENV) or None)


def local_world_size(info: RankInfo) -> int:
    """How many ranks share this machine (torchrun and ``launch_local`` set LOCAL_WORLD_SIZE)."""
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    except ValueError:
        return info.world_size


def default_backend(device: torch.device | str | None = None, info: RankInfo | None = None) -> str:
    """The backend that carries tensors of ``device`` (None: the CPU): gloo on the CPU, nccl
    when every rank on the machine has a GPU of its own, gloo when ranks share one."""
    from ..devices import distributed_backend

    device = torch.device(device if device is not None else "cpu")
    backend = distributed_backend(device, local_world_size(info) if info else 1)
    return "gloo" if backend == "nccl" and not dist.is_nccl_available() else backend


def check_backend(name: str) -> str:
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; install a torch with distributed support")
    available = [b for b in KNOWN_BACKENDS if dist.is_backend_available(b)]
    if name not in available:
        what = "is not available in this torch build" if name in KNOWN_BACKENDS else "is not a known backend"
        raise UserError(f"torch.distributed backend {name!r} {what}; available here: {', '.join(available)}")
    return name


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                       info: RankInfo | None = None, device: torch.device | str | None = None) -> RankInfo:
    """Join the ranks of torchrun or ``launch_local`` (no-op if already joined).  ``device``:
    where this rank's model runs (``devices.rank_device`` gives each rank its GPU); with no
    ``backend`` named, the backend follows it (``default_backend``)."""
    global _store
    info = info or RankInfo.from_env()
    if info is None:
        raise UserError("no rank environment (RANK, WORLD_SIZE): launch with torchrun --nproc-per-node N, "
                        "or with sdinfer's --world-size N")
    backend = check_backend(backend or default_backend(device, info))
    if dist.is_initialized():
        return info
    timeout = datetime.timedelta(seconds=timeout_s)
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        from ..devices import rank_device
        torch.cuda.set_device(rank_device(device, info.local_rank))
    elif backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if info.store:
        host, _, port = info.store.rpartition(":")
        _store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=_store, rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    return info


# ---- in a rank: failures ---------------------------------------------------------------------
class RankStopped(Exception):
    """The launcher stopped this rank (SIGTERM) because another one failed."""


def _stop(signum, frame):
    raise RankStopped("stopped by the launcher")


def leave_note(note: str) -> str | None:
    """Tell the launcher's store why the ranks stop (the first note wins, atomically); returns
    the note that won, or None without a store."""
    if _store is not None:
        try:
            return _store.compare_set(FAILURE_KEY, "", note).decode()
        except RuntimeError:   # the launcher is gone too; nothing to tell
            pass
    return None


def _failure_note(rank: int, message: str) -> str:
    return f"rank {rank} failed: {message}"


def already_said(first_note: str | None, rank: int, message: str) -> bool:
    """Whether another rank has already reported this very failure (every rank refusing the
    same input): then this rank stays quiet, and the user reads the error once."""
    if first_note is None or first_note == _failure_note(rank, message):
        return False
    return first_note.startswith("rank ") and first_note.partition(" failed: ")[2] == message


def read_note(wait_s: float) -> str | None:
    """The failure note, waiting up to ``wait_s`` for the launcher to write it."""
    deadline = time.monotonic() + wait_s
    while _store is not None:
        try:
            if _store.check([FAILURE_KEY]):
                return _store.get(FAILURE_KEY).decode()
        except RuntimeError:
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return None


def _say(message: str) -> None:
    print(f"sdinfer: error: {message}", file=sys.stderr, flush=True)


def run_rank(main: Callable[[], int | None], rank: int | None = None) -> int:
    """Run one rank's work; a failure anywhere is one line naming the failed rank and a
    non-zero exit code (2 for bad input, 1 otherwise) instead of a hang."""
    rank = rank if rank is not None else (RankInfo.from_env() or RankInfo(0, 1, 0)).rank
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        code = main() or 0
        if dist.is_initialized():
            dist.destroy_process_group()
        return code
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # report undisturbed; the launcher kills after its grace
        return _report(rank, err)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(rank: int, err: BaseException) -> int:
    if isinstance(err, (PeerFailure, RankStopped)):
        note = read_note(wait_s=5.0)
        _say(f"rank {rank} stopped because {note}" if note else f"rank {rank} stopped: {err}")
        return 1
    if isinstance(err, UserError):
        if not already_said(leave_note(_failure_note(rank, str(err))), rank, str(err)):
            _say(f"rank {rank}: {err}")
        return 2
    message = f"{type(err).__name__}: {err}"
    if not already_said(leave_note(_failure_note(rank, message)), rank, message):
        traceback.print_exception(err)
        _say(_failure_note(rank, message))
    return 1


# ---- the local launcher ------------------------------------------------------------------
def _exit_note(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} failed (exit code {code})"


def launch_local(command: list[str], world_size: int, poll_s: float = 0.05, grace_s: float = 5.0) -> list[int]:
    """Run ``command`` as ranks 0..N-1 on this machine and wait; returns their exit codes.
    The first rank to fail stops the others: they get ``grace_s`` to stop on their own (their
    collectives fail), then SIGTERM, and SIGKILL ``grace_s`` later."""
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    threads = str(max(1, (os.cpu_count() or 1) // world_size))
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), STORE_ENV: f"127.0.0.1:{store.port}"}
        env.setdefault("OMP_NUM_THREADS", threads)   # the ranks share the cores
        procs.append(subprocess.Popen(command, env=env))
    try:
        return _watch(procs, store, poll_s, grace_s)
    except BaseException:
        _stop_all(procs, grace_s)
        raise


def _watch(procs: list[subprocess.Popen], store, poll_s: float, grace_s: float) -> list[int]:
    codes: list[int | None] = [None] * len(procs)
    failed_at, terminated = None, []
    while any(c is None for c in codes):
        for rank, proc in enumerate(procs):
            if codes[rank] is None and (code := proc.poll()) is not None:
                codes[rank] = code
                if code != 0 and failed_at is None:
                    failed_at = time.monotonic()
                    note = _exit_note(rank, code)
                    said = store.check([FAILURE_KEY])
                    if not said:
                        store.set(FAILURE_KEY, note)
                    if not (said and code == 2):   # a rank that refused its input said why
                        _say(f"{note}; stopping the other ranks")
        late = time.monotonic() - failed_at if failed_at is not None else 0.0
        for proc in procs:
            if proc.poll() is None and late > 2 * grace_s:
                proc.kill()
            elif proc.poll() is None and late > grace_s and proc not in terminated:
                proc.send_signal(signal.SIGTERM)
                terminated.append(proc)
        time.sleep(poll_s)
    return [int(c) for c in codes]


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_code(codes: list[int]) -> int:
    """One exit code for the launcher: 0 if all ranks succeeded, 2 if a rank rejected its input."""
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return 2 if 2 in failed else 1
