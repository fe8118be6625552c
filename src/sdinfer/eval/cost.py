"""Cost measures of a generation: multiply-accumulates and peak memory.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2)
over a whole generation, with the CPU's fused attention kernel counted as torch counts the GPU's.  Peak memory is the CUDA allocator's peak on a GPU and
the process's peak resident set size, sampled every few milliseconds, on a CPU.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Formulas torch's counter lacks: the CPU's fused attention kernel (without it attention costs 0 on a CPU).
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_formulas() -> dict:
    """torch's FLOP formulas by op (as ``FlopCounterMode`` takes them) with ``EXTRA_FLOP_FORMULAS``."""
    return {**flop_registry, **{op: shape_wrapper(f) for op, f in EXTRA_FLOP_FORMULAS.items()}}


def count_macs(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
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


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def call_peak_mb(fn: Callable[[], object]) -> float:
    """The peak resident memory ``fn()`` adds to the process, in MiB: on Linux the kernel's
    high-water mark (VmHWM), reset before the call (``/proc/self/clear_refs``), less the resident
    memory then; elsewhere ``PeakMemory``'s sampled peak.  Memory the allocator kept from earlier
    calls is reused unseen: run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are
    mapped and returned on each call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        mem = PeakMemory()
        with mem.measure():
            before = _rss_bytes() / 2**20 if os.path.exists("/proc/self/statm") else 0.0
            fn()
        return mem.mb - before
    fn()
    return (_status_kb("VmHWM") - base) / 1024
