"""prefix-kernels: fused attention over a shared learned prefix for Prefix Tuning and P-Tuning v1/v2.

Glossary (every shape in the code and docs uses these letters):

    B            batch rows
    L            queries per row
    S            sequence keys per row (S > L when decoding with a KV cache)
    P            prefix length: the number of virtual tokens
    T            prefixes in a bank (several adapters served in one batch, selected per row by prefix_index)
    H, Hq, Hkv   attention heads; query heads / key-value heads (Hq = Hkv, or a multiple of it with GQA)
    D            head dimension
    layers       the number of attention layers (`num_layers`), never written L

The op (`prefix_attention`, `reference_prefix_attention`, `available_backends`) is imported eagerly; the
methods (configs, encoders, models) on first use, so that `import prefix_kernels` does not import transformers.
"""

import importlib

from .ops import available_backends, prefix_attention, reference_prefix_attention

__version__ = "0.1.0"

# Imported on first use.
_LAZY = {
    "PrefixTuningConfig": ".methods.config", "PTuningV2Config": ".methods.config",
    "PrefixEncoder": ".methods.encoders",
    "PrefixModel": ".methods.prefix_model", "get_prefix_model": ".methods.prefix_model",
    "PTuningConfig": ".methods.ptuning", "PTuningModel": ".methods.ptuning", "PromptEncoder": ".methods.ptuning",
    "PrefixTaskModel": ".methods.tasks",
    "MultiPrefixModel": ".methods.bank",
}

__all__ = ["available_backends", "prefix_attention", "reference_prefix_attention", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
