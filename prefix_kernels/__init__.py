"""prefix-kernels: fused attention over a shared learned prefix for Prefix Tuning and P-Tuning v1/v2."""

from .ops import available_backends, prefix_attention, reference_prefix_attention
from .config import PrefixTuningConfig, PTuningV2Config
from .encoders import PrefixEncoder

__version__ = "0.1.0"

__all__ = ["available_backends", "prefix_attention", "reference_prefix_attention", "__version__",
           "PrefixTuningConfig", "PTuningV2Config", "PrefixEncoder", "PrefixModel", "get_prefix_model"]


def __getattr__(name):
    # The transformers integration is imported on first use, so that `import prefix_kernels` stays light.
    if name in ("PrefixModel", "get_prefix_model"):
        from . import transformers as _integration

        return getattr(_integration, name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
