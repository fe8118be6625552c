"""The collectives the parallel strategies use, over one process group, counting what they send.

Every strategy talks through a ``Communicator``: it counts the bytes this rank sends to the
other ranks (its own share of a collective excluded), per kind of collective, so that a test
can hold each strategy to the communication volume derived on paper:

- ``all_gather`` of a local tensor of E bytes over N ranks: each rank's E must reach the
  N - 1 others: E (N - 1) sent.
- ``all_to_all`` of a local tensor of E bytes (N equal chunks, chunk j to rank j): E (N - 1) / N
  sent (the chunk for itself stays).
- ``ring shift`` (send to rank r + 1, receive from rank r - 1) of E bytes: E sent.

A collective that fails because a peer rank stopped (gloo: "Connection closed by peer") or
did not answer within the process group's timeout raises ``PeerFailure``, which the rank
runner (``launch.run_rank``) turns into a message naming the failed rank.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective failed: another rank stopped, was killed or did not answer in time."""


class Communicator:
    """Collectives over ``group`` (None: the default group), with a count of the bytes sent."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("parallel strategies need an initialised torch.distributed process group: "
                             "launch with torchrun or sdinfer's --world-size, or call "
                             "sdinfer.parallel.launch.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.bytes_sent: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset_counts(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def _peer(self, offset: int) -> int:
        """The global rank of the group member ``offset`` places after this one on the ring."""
        local = (self.rank + offset) % self.size
        return local if self.group is None else dist.get_global_rank(self.group, local)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._count("all_gather", _nbytes(x) * (self.size - 1))
        with _translated_failures():
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk j of ``x`` along dim 0 goes to rank j; chunk j of the result came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self._count("all_to_all", _nbytes(x) * (self.size - 1) / self.size)
        with _translated_failures():
            dist.all_to_all_single(out, x, group=self.group)
        return out

    def start_ring_shift(self, x: torch.Tensor) -> "PendingShift":
        """Send ``x`` to the next rank and receive the previous rank's; ``wait()`` gives it."""
        x = x.contiguous()
        received = torch.empty_like(x)
        self._count("ring", _nbytes(x))
        ops = [dist.P2POp(dist.isend, x, self._peer(1), self.group),
               dist.P2POp(dist.irecv, received, self._peer(-1), self.group)]
        with _translated_failures():
            works = dist.batch_isend_irecv(ops)
        return PendingShift(works, received, x)


class PendingShift:
    """A ring shift under way; ``sent`` stays referenced until the send completes."""

    def __init__(self, works, received: torch.Tensor, sent: torch.Tensor):
        self.works, self.received, self.sent = works, received, sent

    def wait(self) -> torch.Tensor:
        with _translated_failures():
            for work in self.works:
                work.wait()
        return self.received


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
