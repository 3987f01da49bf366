"""The C++ backends (`cpu`, `cuda`), built by setup.py as the extension `prefix_kernels._C`."""

from __future__ import annotations

import functools

BUILD_HINT = (
    "build the C++ extension: pip install --no-build-isolation -e . "
    "(needs a C++ compiler; the cuda backend also needs a CUDA build of torch and CUDA_HOME)"
)


@functools.lru_cache(maxsize=None)
def _load_error() -> str | None:
    try:
        from prefix_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"the C++ extension prefix_kernels._C is not built ({exc}); {BUILD_HINT}"
    return None


def unavailable_reason(backend: str) -> str | None:
    return _load_error() or f"the {backend} kernels are not implemented yet"


def cpp_prefix_attention(*args, **kwargs):
    raise RuntimeError(unavailable_reason("cpu"))
