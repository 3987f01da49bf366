from .dispatch import available_backends
from .prefix_attention import prefix_attention
from .reference import reference_prefix_attention

__all__ = ["available_backends", "prefix_attention", "reference_prefix_attention"]
