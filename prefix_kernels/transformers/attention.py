"""The attention function and mask function registered with transformers under the name "prefix_kernels".

transformers calls the mask function once per forward (per mask kind) instead of building its dense
`[B, 1, L, S]` mask; ours returns a `PrefixMask`: the key padding `[B, S]` (None without an attention mask)
and the causal flag, which is all the fused op needs (which key a query sees is decided by the op). The
attention function reads the prefix of its layer from the binding that the wrapping model put on the module
(`LayerBinding`: its state and its slot), so two wrapped models never share state. Nothing here reads tensor
values: no host synchronisation per layer, and torch.compile sees no data-dependent branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from ..ops import Backend, prefix_attention
from .compat import mask_query_shape, module_scaling

ATTN_IMPLEMENTATION = "prefix_kernels"

# Keyword arguments transformers hands attention functions that the fused op honours (is_causal, via the
# mask and the module) or that do not change the attention (bookkeeping the model passes down to every
# layer); any other keyword is refused by name, so that a model feature the op cannot apply never runs
# silently without it.
_HARMLESS_KWARGS = frozenset({
    "position_ids", "cache_position", "is_causal", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict", "num_items_in_batch", "layer_idx", "past_key_values",
    "encoder_hidden_states", "encoder_attention_mask", "token_type_ids",
    # flash-attn's flag for a deterministic backward (ModernBERT); the fused op is deterministic by default
    "deterministic",
})
# Features some families pass as keywords; None (or False) means the feature is off for this call.
_FEATURE_KWARGS = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "position_bias": "an additive position bias",
    "s_aux": "attention sinks",
    "cu_seq_lens_q": "packed (varlen) sequences",
    "cu_seq_lens_k": "packed (varlen) sequences",
    "max_length_q": "packed (varlen) sequences",
    "max_length_k": "packed (varlen) sequences",
    "seq_idx": "packed (varlen) sequences",
    "head_mask": "a head mask",
}


def check_attention_kwargs(kwargs: dict) -> None:
    """Refuse every attention keyword the fused op neither honours nor knows to be harmless."""
    for name, value in kwargs.items():
        if name in _HARMLESS_KWARGS:
            continue
        if name in _FEATURE_KWARGS:
            if value is None or value is False:
                continue
            raise NotImplementedError(f"prefix_kernels does not support {_FEATURE_KWARGS[name]} "
                                      f"({name}={value!r})")
        raise NotImplementedError(
            f"prefix_kernels does not know the attention keyword argument {name!r} this model passes "
            f"(value {type(value).__name__}); the fused op cannot tell whether ignoring it changes the attention")


@dataclass(frozen=True)
class PrefixMask:
    """The compact mask handed to the fused op: `key_padding_mask` bool `[B, S]` (True = real token; None
    without an attention mask) and `causal`. The prefix is never masked. `unsupported`: why the op cannot
    apply the mask transformers asked for; raised by the layers that use it, since models build masks they
    may not use (ModernBERT builds a sliding-window mask even when every layer is global)."""

    key_padding_mask: torch.Tensor | None
    causal: bool
    unsupported: str | None = None


def prefix_mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs,
) -> PrefixMask:
    # transformers < 5.4 passes cache_position instead of q_length / q_offset.
    q_length, q_offset = mask_query_shape(q_length, q_offset, cache_position)
    if kv_length is None:
        raise TypeError("the mask function needs kv_length")
    if kv_offset:
        return PrefixMask(None, True, f"prefix_kernels does not support a key offset (sliding caches), got {kv_offset}")
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        return PrefixMask(None, True, (
            "prefix_kernels supports causal and bidirectional attention with key padding; this model asked for "
            f"another mask pattern ({getattr(mask_function, '__name__', mask_function)!r}: sliding window, "
            "packed sequences or a custom overlay)"))
    padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be 2D [batch, keys], got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] < kv_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, expected {kv_length}")
        # Kept even when nothing is padded: testing that would sync the device, and the kernels skip
        # all-padding key blocks anyway.
        padding = attention_mask[:, -kv_length:].to(torch.bool)
    return PrefixMask(padding, causal)


class PrefixSource(Protocol):
    """What the attention function needs from the model that owns the prefix (its per-step state)."""

    prefix_index: torch.Tensor | None  # int64 [B], values checked once per forward; None: one shared prefix

    def layer_prefix(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """That layer's prefix keys and values, [Hkv, P, D] (or [T, Hkv, P, D] with prefix_index), in dtype."""

    def backend_for(self, device: torch.device) -> Backend:
        """The op backend for this device, resolved once per model."""


@dataclass
class LayerBinding:
    """Put on each attention module (`module._prefix_kernels`): its model's prefix state and its slot."""

    state: PrefixSource
    slot: int


def prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    binding = getattr(module, "_prefix_kernels", None)
    if binding is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} is set on a module that is not part of a "
            "PrefixModel; wrap the model with prefix_kernels.get_prefix_model(model, config)")
    check_attention_kwargs(kwargs)

    if isinstance(attention_mask, PrefixMask):
        if attention_mask.unsupported:
            raise NotImplementedError(attention_mask.unsupported)
        padding, causal = attention_mask.key_padding_mask, attention_mask.causal
    elif attention_mask is None:
        padding = None
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        padding = attention_mask.to(torch.bool)
        causal = bool(getattr(module, "is_causal", True))
    else:
        raise TypeError(
            "prefix_kernels takes a 2D attention_mask [batch, keys] (it builds no dense mask); got "
            f"{type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}")
    B, S = key.shape[0], key.shape[2]
    if padding is not None and tuple(padding.shape) != (B, S):
        raise ValueError(f"key padding mask must be [batch, keys] = {(B, S)}, got {tuple(padding.shape)} "
                         "(static caches are not supported; use the default DynamicCache)")
    if padding is not None and padding.device != query.device:
        padding = padding.to(query.device)

    if scaling is None:
        scaling = module_scaling(module, query.shape[-1])
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # What SDPA does under autocast: RoPE leaves q and k in fp32 while v comes out of a bf16 matmul.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    state = binding.state
    prefix_k, prefix_v = state.layer_prefix(binding.slot, query.dtype)
    # A state serving several prefixes (MultiPrefixModel) says which one each row reads.
    prefix_index = state.prefix_index
    if prefix_index is not None:
        if prefix_index.shape[0] != B:
            raise ValueError(f"prefix_index has {prefix_index.shape[0]} rows but the batch has {B} (generate "
                             "with beams or num_return_sequences expands the batch: pass the expanded prefix_index)")
        prefix_index = prefix_index.to(query.device)
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        causal=causal, key_padding_mask=padding,
        scale=scaling, dropout_p=float(dropout) if module.training else 0.0,
        prefix_index=prefix_index, backend=state.backend_for(query.device), check_prefix_index=False,
    )
    # out has the layout of query, transformers' [B, L, H, D] buffer seen as [B, H, L, D]: this transpose is
    # the contiguous [B, L, H, D] that transformers reshapes next, without a copy.
    return out.transpose(1, 2), None


def register() -> None:
    """Register the attention and mask functions (idempotent; done on import of this subpackage)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_mask_function)


register()
