"""Cost measures of a generation: multiply-accumulates and peak memory.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)
over a whole generation.  Peak memory is the CUDA allocator's peak on a GPU and
the process's peak resident set size, sampled every few milliseconds, on a CPU.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_macs(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops() // 2)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Context manager; ``.mb`` holds the peak in MiB once it exits."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.mb = float("nan")

    @contextmanager
    def measure(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            yield self
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        if not os.path.exists("/proc/self/statm"):
            yield self
            return
        peak = [_rss_bytes()]
        stop = threading.Event()

        def sample():
            while not stop.wait(self.interval_s):
                peak[0] = max(peak[0], _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.mb = max(peak[0], _rss_bytes()) / 2**20
