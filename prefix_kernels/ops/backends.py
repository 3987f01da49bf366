"""The backends, one record each, and the one place that decides which of them runs a call.

A `Backend` says whether it can run on a device (and why not), which of the op's optional features it
implements, and holds its forward and backward ops (the schema in `library.py`). `backend=None` takes the
fastest backend available for the device that implements the features the call uses;
`PREFIX_KERNELS_BACKEND` overrides that default (an explicit name still wins). A fallback is logged once per
(device type, chosen backend), so a slow path is never silent. Resolving is cheap but not free: callers that
run the op many times (the transformers integration) resolve once per device and keep the record.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import library
from .triton import interpreting

logger = logging.getLogger("prefix_kernels")

BACKENDS = library.BACKEND_NAMES
# Preference order per device type.
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "PREFIX_KERNELS_BACKEND"
# Which kernels the triton backend's backward runs (docs/kernels.md "The fused backward", "The atomic backward"):
# "split" (bwd_dq + bwd_dkdv, the default), "fused" (one launch) or "atomic" (FlashAttention-2's: bwd_dkdv and
# bwd_dprefix add dq with fp32 atomics, no bwd_dq; deterministic=False calls only). The last two are opt-in until
# a GPU has timed all three. Read at every backward, and by get_prefix_model when it wraps a model.
TRITON_BWD_ENV = "PREFIX_KERNELS_TRITON_BWD"
TRITON_BWD_MODES = ("split", "fused", "atomic")


def triton_bwd_mode(deterministic: bool = True) -> str:
    """The triton backward's mode from TRITON_BWD_ENV; ValueError for an unknown one, or for "atomic" (whose dq
    adds are not bitwise repeatable) with a deterministic call."""
    mode = os.environ.get(TRITON_BWD_ENV, "") or "split"
    if mode not in TRITON_BWD_MODES:
        raise ValueError(f"{TRITON_BWD_ENV}={mode!r}: expected one of {', '.join(TRITON_BWD_MODES)} "
                         f"(or unset, = split)")
    if mode == "atomic" and deterministic:
        raise ValueError(f"{TRITON_BWD_ENV}=atomic adds dq with fp32 atomics, whose order varies from run to run: "
                         f"it needs deterministic=False (or {TRITON_BWD_ENV}=split or fused for a deterministic "
                         f"backward)")
    return mode


# How the triton forward reads its tiles (docs/kernels.md "TMA"): "pointers" (the default: masked loads, any GPU) or
# "tma" (tensor descriptors, sm_90 and newer: the copy engine moves whole tiles; calls it cannot take run on
# pointers). Opt-in until a GPU has timed it against pointers. Read at every forward and by get_prefix_model.
TRITON_FWD_ENV = "PREFIX_KERNELS_TRITON_FWD"
TRITON_FWD_MODES = ("pointers", "tma")


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def cuda_arch(device: torch.device) -> int | None:
    """The compute capability (major * 10 + minor) of a CUDA device, None for any other device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def triton_fwd_mode(arch: int | None = None) -> str:
    """The triton forward's mode from TRITON_FWD_ENV; ValueError for an unknown one, or for "tma" on a CUDA device
    of compute capability `arch` (major * 10 + minor) below 90, which has no TMA. None: no CUDA device (the
    interpreter, which emulates the descriptors)."""
    mode = os.environ.get(TRITON_FWD_ENV, "") or "pointers"
    if mode not in TRITON_FWD_MODES:
        raise ValueError(f"{TRITON_FWD_ENV}={mode!r}: expected one of {', '.join(TRITON_FWD_MODES)} "
                         f"(or unset, = pointers)")
    if mode == "tma" and arch is not None and arch < 90:
        raise ValueError(f"{TRITON_FWD_ENV}=tma needs a GPU with TMA (compute capability 9.0 or newer); this one "
                         f"is {arch // 10}.{arch % 10} (unset it, or set it to pointers)")
    if mode == "tma" and not _has_module("triton.tools.tensor_descriptor"):
        raise ValueError(f"{TRITON_FWD_ENV}=tma needs Triton's host tensor descriptors "
                         f"(triton.tools.tensor_descriptor), which this Triton does not have")
    return mode


# The op's optional features (docs/op.md) and which backends implement them.
FEATURES = {
    "window": "sliding windows (window)",
    "softcap": "logit soft-capping (softcap)",
    "sinks": "attention sinks (sinks)",
    "packed": "packed sequences (cu_seqlens)",
}
_IMPLEMENTS = {
    "reference": frozenset(FEATURES),
    "cpu": frozenset(FEATURES),
    "triton": frozenset(FEATURES),
    "cuda": frozenset(),
}


def features_of(*, window=None, softcap=None, sinks=None, cu_seqlens=None) -> tuple[str, ...]:
    """The optional features a call uses, in FEATURES order (a hashable key)."""
    used = {"window": window is not None, "softcap": softcap is not None, "sinks": sinks is not None,
            "packed": cu_seqlens is not None}
    return tuple(name for name in FEATURES if used[name])


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """Import the module that registers a backend's implementations; None on success, else why it failed."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return str(exc)
    return None


def _triton_reason(device: torch.device) -> str | None:
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    error = _import_error("prefix_kernels.ops.triton.launch")
    return None if error is None else f"triton is not installed or failed to import ({error}); pip install triton"


def _compiled_reason(backend: str, device: torch.device) -> str | None:
    from . import extension

    if device.type != backend:
        return f"the {backend} backend needs {backend} tensors, got {device.type} tensors"
    return extension.unavailable_reason(backend)


_REASONS: dict[str, Callable[[torch.device], str | None]] = {
    "reference": lambda device: None,
    "triton": _triton_reason,
    "cpu": functools.partial(_compiled_reason, "cpu"),
    "cuda": functools.partial(_compiled_reason, "cuda"),
}


@dataclass(frozen=True)
class Backend:
    """One implementation of the op: `fwd`/`bwd` are `torch.ops.prefix_kernels.{name}_fwd/_bwd`."""

    name: str

    @property
    def implements(self) -> frozenset[str]:
        return _IMPLEMENTS[self.name]

    def missing(self, features) -> str | None:
        """None if this backend implements every feature named, else a sentence naming those it lacks."""
        lacking = [FEATURES[f] for f in features if f not in self.implements]
        return None if not lacking else f"the {self.name} backend does not implement {', '.join(lacking)}"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return _REASONS[self.name](torch.device(device))

    @property
    def fwd(self):
        return getattr(torch.ops.prefix_kernels, f"{self.name}_fwd").default

    @property
    def bwd(self):
        return getattr(torch.ops.prefix_kernels, f"{self.name}_bwd").default


_RECORDS = {name: Backend(name) for name in BACKENDS}


def backend(name: str) -> Backend:
    if name not in _RECORDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return _RECORDS[name]


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None if backend `name` can run on `device`, else a sentence saying why not and what to do."""
    return backend(name).unavailable_reason(torch.device(device))


@functools.lru_cache(maxsize=None)
def _log_fallback_once(device_type: str, chosen: str, reasons: str) -> None:
    logger.warning("prefix_kernels: using the %s backend for %s tensors (%s)", chosen, device_type, reasons)


def resolve_backend(name: str | Backend | None, device: torch.device | str, features: tuple[str, ...] = ()) -> Backend:
    """The record that runs on `device` with `features` (see `features_of`): `name` (error if unavailable or
    lacking a feature) or, for None, the fastest available that implements them."""
    if isinstance(name, Backend):
        missing = name.missing(features)
        if missing:
            raise RuntimeError(f"prefix_attention backend {name.name!r} cannot run this call: {missing}")
        return name
    return _RECORDS[_resolve_name(name, str(torch.device(device)), tuple(features))]


# A constant for torch.compile: the availability checks ask the dispatcher and import modules, which a traced
# function must not do on every call (and Dynamo cannot trace).
@torch.compiler.assume_constant_result
def _resolve_name(name: str | None, device_name: str, features: tuple[str, ...]) -> str:
    device = torch.device(device_name)
    explicit = name is not None
    if name is None:
        name = os.environ.get(ENV_VAR) or None
    if name is not None:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(f"prefix_attention backend {name!r} is unavailable: {reason}")
        missing = backend(name).missing(features)
        if missing is None:
            return name
        if explicit:
            raise RuntimeError(f"prefix_attention backend {name!r} cannot run this call: {missing}; "
                               f"pass backend=None to take one that can")
    skipped = [] if name is None else [f"{name}: {backend(name).missing(features)}"]
    for candidate in _PREFERENCE.get(device.type, ("reference",)):
        reason = unavailable_reason(candidate, device) or backend(candidate).missing(features)
        if reason is None:
            if skipped:
                _log_fallback_once(device.type, candidate, "; ".join(skipped))
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise AssertionError("the reference backend is always available")


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]
