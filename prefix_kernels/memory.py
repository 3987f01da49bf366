"""Measuring peak CPU memory with glibc: its allocator keeps freed blocks, so the resident set hides them.

`exact_cpu_memory()` makes glibc hand freed memory back at once (blocks from 128 KiB are mmap'ed and unmapped
on free, the heap is trimmed on entry), so the resident set follows the live tensors. That costs time (every
large tensor is a fresh mapping, page faults included: a SmolLM2 training step takes about twice as long), so
on exit glibc's fast settings are restored: time code outside the block, measure memory inside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

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
