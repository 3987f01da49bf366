"""Choosing a backend: one place decides which implementation runs a call.

`backend=None` takes the fastest backend available for the tensors' device; `PREFIX_KERNELS_BACKEND`
overrides that default (an explicit `backend=` argument still wins). A fallback is logged once per
(device type, chosen backend) so that a slow path is never silent, and never logged again.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("prefix_kernels")

BACKENDS = ("triton", "cuda", "cpu", "reference")
# Preference order per device type.
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "PREFIX_KERNELS_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else a sentence saying why not and what to do."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if backend in ("cpu", "cuda"):
        from . import cpp

        if device.type != backend:
            return f"the {backend} backend needs {backend} tensors, got {device.type} tensors"
        return cpp.unavailable_reason(backend)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


@functools.lru_cache(maxsize=None)
def _log_fallback_once(device_type: str, chosen: str, reasons: str) -> None:
    logger.warning("prefix_kernels: using the %s backend for %s tensors (%s)", chosen, device_type, reasons)


def choose_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is not None:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"prefix_attention backend {backend!r} is unavailable: {reason}")
        return backend
    preference = _PREFERENCE.get(device.type, ("reference",))
    skipped = []
    for name in preference:
        reason = unavailable_reason(name, device)
        if reason is None:
            if skipped:
                _log_fallback_once(device.type, name, "; ".join(skipped))
            return name
        skipped.append(f"{name}: {reason}")
    raise AssertionError("the reference backend is always available")


def backend_function(name: str) -> Callable:
    if name == "reference":
        from .reference import reference_prefix_attention

        return reference_prefix_attention
    if name == "triton":
        from .triton.op import triton_prefix_attention

        return triton_prefix_attention
    from . import cpp

    return cpp.cpp_prefix_attention


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]
