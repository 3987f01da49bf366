"""The one peak-memory meter of the demo, the example and the benchmarks: the peak a block adds on top of
what was allocated when it started, counting everything it allocates (outputs, gradients, saved activations,
temporaries freed before it ends).

    with PeakMemory(device) as mem:
        step()
    mem.peak  # bytes (mem.mib in MiB)

CUDA: the allocator's `max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated` at
entry. CPU: the growth of the process's peak resident set, VmHWM (reset at entry through /proc/self/clear_refs)
minus VmRSS at entry, read under `exact_cpu_memory()` so that memory freed inside the block leaves the resident
set instead of staying in glibc's cache; NaN where /proc/self/clear_refs cannot be written (not Linux). The
CPU mode slows large allocations, so time code outside the meter.

`exact_cpu_memory()`: glibc's allocator keeps freed blocks, so the resident set hides them. Inside, glibc
hands freed memory back at once (blocks from 128 KiB are mmap'ed and unmapped on free, the heap is trimmed on
entry), so the resident set follows the live tensors. That costs time (every large tensor is a fresh mapping,
page faults included: a SmolLM2 training step takes about twice as long), so on exit glibc's fast settings are
restored.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


@contextlib.contextmanager
def exact_cpu_memory():
    """Inside: freed memory leaves the resident set at once. After: glibc's fast settings (a fixed 32 MiB
    mmap threshold, the most its own dynamic threshold reaches). A no-op without glibc."""
    _set(128 * 1024, 128 * 1024)
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        yield
    finally:
        _set(32 * 2**20, 64 * 2**20)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """VmHWM := VmRSS now; False where the kernel does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory (bytes, in `.peak` after the block) that the block adds above what was allocated at entry;
    see the module docstring for the method on CUDA and on CPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak: float = math.nan

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        self._exact = exact_cpu_memory()
        self._exact.__enter__()
        self._before = _status_bytes("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
            return False
        try:
            if self._before is not None:
                self.peak = _status_bytes("VmHWM") - self._before
        finally:
            self._exact.__exit__(*exc)
        return False
