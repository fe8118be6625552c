"""The collectives the parallel strategies use, over one process group, counting what they send.

Every strategy talks through a ``Communicator``: it counts the bytes this rank sends to the
other ranks (its own share of a collective excluded), per kind of collective, so that a test
can hold each strategy to the communication volume derived on paper:

- ``all_gather`` of a local tensor of E bytes over N ranks: each rank's E must reach the
  N - 1 others: E (N - 1) sent.
- ``all_to_all`` of a local tensor of E bytes (N equal chunks, chunk j to rank j): E (N - 1) / N
  sent (the chunk for itself stays).
- ``ring shift`` (send to rank r + 1, receive from rank r - 1) of E bytes: E sent.
- ``all_reduce`` (sum) of E bytes: 2 E (N - 1) / N sent (the bandwidth-optimal ring's count);
- ``send`` of E bytes to one rank: E sent; ``broadcast`` of E bytes from the source rank:
  E (N - 1) sent by the source, nothing by the others.

Asynchronous collectives (``start_all_gather``, ``start_ring_shift``, ``start_send``,
``start_recv``, ``start_broadcast``) return a ``Pending`` whose ``wait()`` gives the result;
the time a rank spends blocked in collectives (synchronous ones whole, asynchronous ones in
``wait()``) is summed per kind in ``blocked_s``; for the collectives waited for later than they
started (``Pending.wait``, not the synchronous wrappers) the bytes, calls and blocked time are
also summed in ``overlapped``, so that a benchmark can tell how much of that communication was
hidden behind compute.

A collective that fails because a peer rank stopped (gloo: "Connection closed by peer") or
did not answer within the process group's timeout raises ``PeerFailure``, which the rank
runner (``launch.run_rank``) turns into a message naming the failed rank.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective failed: another rank stopped, was killed or did not answer in time."""


class Communicator:
    """Collectives over ``group`` (None: the default group), with a count of the bytes sent."""

    def __init__(self, group: dist.ProcessGroup | None = None, counts: "Communicator | None" = None):
        """``counts``: another communicator whose counts this one adds to (a strategy made of
        several groups reports one total)."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel strategies need an initialised torch.distributed process group: "
                             "launch with torchrun or sdinfer's --world-size, or call "
                             "sdinfer.parallel.launch.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.bytes_sent: Counter[str] = Counter() if counts is None else counts.bytes_sent
        self.calls: Counter[str] = Counter() if counts is None else counts.calls
        self.blocked_s: Counter[str] = Counter() if counts is None else counts.blocked_s
        self.overlapped: Counter[str] = Counter() if counts is None else counts.overlapped   # bytes, calls, blocked_s

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset_counts(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()
        self.blocked_s.clear()
        self.overlapped.clear()

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def _peer(self, offset: int) -> int:
        """The global rank of the group member ``offset`` places after this one on the ring."""
        return self._global((self.rank + offset) % self.size)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        return self.start_all_gather(x, dim).wait_now()

    def start_all_gather(self, x: torch.Tensor, dim: int) -> "Pending":
        """``all_gather`` under way; ``wait()`` gives the concatenation."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._count("all_gather", _nbytes(x) * (self.size - 1))
        with _translated_failures():
            work = dist.all_gather(parts, x, group=self.group, async_op=True)
        return Pending(self, "all_gather", [work], lambda: torch.cat(parts, dim=dim), x,
                       _nbytes(x) * (self.size - 1))

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk j of ``x`` along dim 0 goes to rank j; chunk j of the result came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._count("all_to_all", _nbytes(x) * (self.size - 1) / self.size)
        with _translated_failures(), self._blocked("all_to_all"):
            dist.all_to_all_single(out, x, group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x``."""
        out = x.clone()
        self._count("all_reduce", _nbytes(x) * 2 * (self.size - 1) / self.size)
        with _translated_failures(), self._blocked("all_reduce"):
            dist.all_reduce(out, group=self.group)
        return out

    def start_ring_shift(self, x: torch.Tensor) -> "Pending":
        """Send ``x`` to the next rank and receive the previous rank's; ``wait()`` gives it."""
        x = x.contiguous()
        received = torch.empty_like(x)
        self._count("ring", _nbytes(x))
        ops = [dist.P2POp(dist.isend, x, self._peer(1), self.group),
               dist.P2POp(dist.irecv, received, self._peer(-1), self.group)]
        with _translated_failures():
            works = dist.batch_isend_irecv(ops)
        return Pending(self, "ring", works, lambda: received, x, _nbytes(x))

    def start_send(self, x: torch.Tensor, dst: int) -> "Pending":
        """Send ``x`` to group rank ``dst``; ``wait()`` returns once it left."""
        x = x.contiguous()
        self._count("send", _nbytes(x))
        with _translated_failures():
            work = dist.isend(x, self._global(dst), group=self.group)
        return Pending(self, "send", [work], lambda: x, x, _nbytes(x))

    def start_recv(self, like: torch.Tensor, src: int) -> "Pending":
        """Receive a tensor shaped and typed like ``like`` from group rank ``src``."""
        received = torch.empty_like(like)
        with _translated_failures():
            work = dist.irecv(received, self._global(src), group=self.group)
        return Pending(self, "send", [work], lambda: received, None)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Group rank ``src``'s ``x`` on every rank."""
        return self.start_broadcast(x, src).wait_now()

    def start_broadcast(self, x: torch.Tensor, src: int) -> "Pending":
        """Group rank ``src``'s ``x`` to every rank (the others pass a tensor shaped like it)."""
        x = x.contiguous() if self.rank == src else torch.empty_like(x)
        if self.rank == src:
            self._count("broadcast", _nbytes(x) * (self.size - 1))
        with _translated_failures():
            work = dist.broadcast(x, self._global(src), group=self.group, async_op=True)
        return Pending(self, "broadcast", [work], lambda: x, x,
                       _nbytes(x) * (self.size - 1) if self.rank == src else 0)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    @contextlib.contextmanager
    def _blocked(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.blocked_s[kind] += time.perf_counter() - start


class Pending:
    """A collective under way; what it sends stays referenced until it completes."""

    def __init__(self, comm: Communicator, kind: str, works, result, sent: torch.Tensor | None,
                 nbytes: float = 0):
        self.comm, self.kind, self.works, self.result, self.sent = comm, kind, works, result, sent
        self.nbytes = nbytes

    def wait_now(self) -> torch.Tensor:
        """Wait right after starting (a synchronous collective)."""
        with _translated_failures(), self.comm._blocked(self.kind):
            for work in self.works:
                work.wait()
        return self.result()

    def wait(self) -> torch.Tensor:
        """Wait for a collective started earlier, with compute in between (counted as overlapped)."""
        before = self.comm.blocked_s[self.kind]
        out = self.wait_now()
        counted = self.comm.overlapped
        counted["bytes"] += int(self.nbytes)
        counted["calls"] += 1
        counted["blocked_s"] += self.comm.blocked_s[self.kind] - before
        return out


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


@contextlib.contextmanager
def _translated_failures():
    """Re-raise a failed collective as ``PeerFailure``, naming the peer where it is the only one."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as err:
        others = [r for r in range(dist.get_world_size()) if r != dist.get_rank()]
        peer = f"rank {others[0]}" if len(others) == 1 else "another rank"
        raise PeerFailure(f"a collective with the other ranks failed: {peer} stopped, was killed or did "
                          f"not answer within the timeout ({_first_sentence(err)})") from err


def _first_sentence(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0]
