"""The transformers glue: the attention function, the mask function and the family table.

Importing this subpackage registers the "prefix_kernels" attention function and mask function with
transformers' `AttentionInterface` and `AttentionMaskInterface`. The models that own a prefix and bind it to
the attention modules are the methods' (`prefix_kernels.methods`); nothing here imports them.
"""

from .attention import (ATTN_IMPLEMENTATION, LayerBinding, PrefixMask, PrefixSource, prefix_attention_forward,
                        prefix_mask_function)
from .families import FAMILIES, UNSUPPORTED, ModelLayout, check_position_offset, detect

__all__ = ["ATTN_IMPLEMENTATION", "FAMILIES", "LayerBinding", "ModelLayout", "PrefixMask", "PrefixSource",
           "UNSUPPORTED", "check_position_offset", "detect", "prefix_attention_forward", "prefix_mask_function"]
