"""prefix-kernels: fused attention over a shared learned prefix for Prefix Tuning and P-Tuning v1/v2."""

from .ops import available_backends, prefix_attention, reference_prefix_attention

__version__ = "0.1.0"

__all__ = ["available_backends", "prefix_attention", "reference_prefix_attention", "__version__"]
