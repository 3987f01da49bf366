"""The compiled backends `cpu` and `cuda`: the C++ extension `prefix_kernels.ops._C`, built by setup.py.

Loading `_C` registers its implementations of `cpu_fwd`/`cpu_bwd` (csrc/cpu) and, in a CUDA build,
`cuda_fwd`/`cuda_bwd` (csrc/cuda) under the schemas of `library.py`, which must therefore be imported first.
"""

from __future__ import annotations

import functools

import torch

from . import library  # noqa: F401  (the schemas the extension implements)

BUILD_HINT = (
    "build the C++ extension: pip install --no-build-isolation -e . "
    "(needs a C++ compiler; the cuda backend also needs a CUDA build of torch and CUDA_HOME)"
)


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once `_C` is loaded, else why it cannot be."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        return f"the C++ extension prefix_kernels.ops._C is not built ({exc}); {BUILD_HINT}"
    return None


def unavailable_reason(backend: str) -> str | None:
    """None if the `cpu` / `cuda` kernels can run here, else why not."""
    error = load_error()
    if error is not None:
        return error
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    if backend == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"prefix_kernels::{backend}_fwd", key):
        return (f"prefix_kernels.ops._C has no {backend} kernels (a CUDA build needs a CUDA build of torch and "
                f"CUDA_HOME set); {BUILD_HINT}")
    return None
