"""The op: attention over [shared prefix] + [sequence] (docs/op.md). Self-contained: torch, triton and the
compiled extension `prefix_kernels.ops._C`, nothing else of the package. Importing it registers the op's
schema, fakes and autograd for every backend (`library.py`)."""

from . import library  # noqa: F401  (registers the ops before anything can call them)
from .attention import prefix_attention
from .backends import Backend, available_backends, resolve_backend
from .reference import reference_prefix_attention

__all__ = ["Backend", "available_backends", "prefix_attention", "reference_prefix_attention", "resolve_backend"]
