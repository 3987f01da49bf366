"""Hugging Face transformers integration: train a prefix with the fused op without touching model code.

    model = prefix_kernels.get_prefix_model(model, prefix_kernels.PrefixTuningConfig(num_virtual_tokens=20))

Importing this subpackage registers the "prefix_kernels" attention function and mask function with
transformers' `AttentionInterface` and `AttentionMaskInterface`.
"""

from .attention import ATTN_IMPLEMENTATION, PrefixMask, prefix_attention_forward, prefix_mask_function
from .families import FAMILIES, UNSUPPORTED
from .model import PrefixModel, get_prefix_model

__all__ = ["ATTN_IMPLEMENTATION", "FAMILIES", "PrefixMask", "PrefixModel", "UNSUPPORTED", "get_prefix_model",
           "prefix_attention_forward", "prefix_mask_function"]
