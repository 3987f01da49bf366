"""prefix-kernels: fused attention over a shared learned prefix for Prefix Tuning and P-Tuning v1/v2."""

import importlib

from .config import PrefixTuningConfig, PTuningV2Config
from .encoders import PrefixEncoder
from .ops import available_backends, prefix_attention, reference_prefix_attention

__version__ = "0.1.0"

# Imported on first use, so that `import prefix_kernels` does not import transformers.
_LAZY = {
    "PrefixModel": ".transformers", "get_prefix_model": ".transformers",
    "PTuningConfig": ".ptuning", "PTuningModel": ".ptuning", "PromptEncoder": ".ptuning",
    "PrefixTaskModel": ".tasks", "MultiPrefixModel": ".serving",
}

__all__ = ["available_backends", "prefix_attention", "reference_prefix_attention", "__version__",
           "PrefixTuningConfig", "PTuningV2Config", "PrefixEncoder", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
