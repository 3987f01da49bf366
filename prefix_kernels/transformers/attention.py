"""The attention function and mask function registered with transformers under the name "prefix_kernels".

transformers calls the mask function once per forward (per mask kind) instead of building its dense
`[B, 1, L, S]` mask; ours returns a `PrefixMask`: the key padding `[B, S]` (None without an attention mask; the
slice of the attention mask for the keys the layer gets, which a sliding-window cache shortens), the causal
flag, the sliding window and whether transformers found packed sequences, which is all the fused op needs
(which key a query sees is decided by the op). The mask pattern is read from the structure of the mask
function transformers composes (`mask_pattern`); a pattern the op cannot apply is refused by name. The
attention function reads the prefix of its layer from the binding that the wrapping model put on the module
(`LayerBinding`: its state and its slot), so two wrapped models never share state, and the per-call features
(`sliding_window`, `softcap`, `s_aux`) from its keyword arguments. Nothing here reads tensor values: no host
synchronisation per layer, and torch.compile sees no data-dependent branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from ..ops import Backend, prefix_attention
from ..ops.backends import features_of
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
# Features the op applies per call: the layer's window (Mistral, Phi-3, Qwen2, Gemma 2/3, GPT-OSS), Gemma 2's
# logit soft-capping, GPT-OSS's sinks. Read by `attention_features`.
_HONOURED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux"})
# Packed sequences: what DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True) adds.
# The wrapper turns them (or position ids that restart) into `cu_seqlens` once per forward (the state's); a
# layer accepts them only when the state is packed.
_PACKING_KWARGS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})
# Features some families pass as keywords that the op does not apply; None (or False) means off for this call.
_FEATURE_KWARGS = {
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
    **{name: "packed (varlen) sequences" for name in _PACKING_KWARGS},
}


def check_attention_kwargs(kwargs: dict, packed: bool = False) -> None:
    """Refuse every attention keyword the fused op neither honours nor knows to be harmless. `packed`: the
    wrapper turned this forward's packed sequences into `cu_seqlens`, so the packing keywords are honoured."""
    for name, value in kwargs.items():
        if name in _HARMLESS_KWARGS or name in _HONOURED_KWARGS or (packed and name in _PACKING_KWARGS):
            continue
        if name in _FEATURE_KWARGS:
            if value is None or value is False:
                continue
            raise NotImplementedError(f"prefix_kernels does not support {_FEATURE_KWARGS[name]} "
                                      f"({name}={_short(value)})")
        raise NotImplementedError(
            f"prefix_kernels does not know the attention keyword argument {name!r} this model passes "
            f"(value {type(value).__name__}); the fused op cannot tell whether ignoring it changes the attention")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return repr(value)


# ------------------------------------------------------------------------------------------------ mask patterns
@dataclass(frozen=True)
class MaskPattern:
    """What a transformers mask function means, in the op's terms: causal or not, a causal sliding window
    (`q - kv < window`, transformers' `sliding_window_overlay`), and whether transformers found packed
    sequences (its `packed_sequence_mask_function`, with positions remapped per sequence from 5.x)."""

    causal: bool
    window: int | None = None
    packed: bool = False


_MASKING_MODULE = causal_mask_function.__module__
# transformers' closures (masking_utils), by qualified name, that no fused pattern covers, and why.
_REFUSED_OVERLAYS = {
    "or_masks.<locals>.or_mask": "a union of mask patterns (an or_mask_function: bidirectional image blocks, "
                                 "bidirectional attention overlays)",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask": "bidirectional (symmetric) sliding-window "
                                                                 "attention",
    "chunked_overlay.<locals>.inner_mask": "chunked attention",
    "blockwise_overlay.<locals>.inner_mask": "blockwise (bidirectional block) attention",
    "padding_mask_function.<locals>.inner_mask": "a padding overlay inside the mask function",
}


def _cells(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def mask_pattern(mask_function) -> MaskPattern | str:
    """The `MaskPattern` of a mask function transformers composed (`and_masks` of causal or bidirectional, the
    sliding-window overlay and the packed-sequence functions), or a sentence saying why the op cannot apply it.
    Reads the structure of transformers' closures (their names and captured values), never a tensor."""
    bases, windows, packed, refused = [], [], False, []

    def walk(fn):
        nonlocal packed
        if fn is causal_mask_function or fn is bidirectional_mask_function:
            bases.append(fn is causal_mask_function)
            return
        name = getattr(fn, "__qualname__", None)
        if getattr(fn, "__module__", None) != _MASKING_MODULE or not hasattr(fn, "__code__"):
            refused.append(f"another mask pattern ({getattr(fn, '__name__', fn)!r})")
        elif name == "and_masks.<locals>.and_mask":
            for inner in _cells(fn)["mask_functions"]:
                walk(inner)
        elif name == "sliding_window_overlay.<locals>.inner_mask":
            windows.append(_cells(fn)["sliding_window"])
        elif name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            packed = True
            walk(_cells(fn)["mask_function"])
        elif name == "packed_sequence_mask_function.<locals>.inner_mask":
            packed = True
        elif name in _REFUSED_OVERLAYS:
            refused.append(_REFUSED_OVERLAYS[name])
        else:
            refused.append(f"another mask pattern ({name!r})")

    walk(mask_function)
    if refused:
        return ("prefix_kernels supports causal and bidirectional attention with key padding, causal sliding "
                f"windows and packed sequences; this model asked for {'; '.join(refused)}")
    if len(bases) != 1:
        return f"prefix_kernels cannot read this mask function ({getattr(mask_function, '__name__', '?')!r})"
    causal = bases[0]
    window = None
    for w in windows:
        if isinstance(w, torch.Tensor):  # a 0-d tensor (a compiled cache); its value is on the host
            w = int(w)
        window = w if window is None else min(window, w)
    if window is not None and not causal:
        return "prefix_kernels does not support bidirectional sliding-window attention"
    return MaskPattern(causal, window, packed)


@dataclass(frozen=True)
class PrefixMask:
    """The compact mask handed to the fused op: `key_padding_mask` bool `[B, S]` (True = real token; None
    without an attention mask), `causal`, `window` (the causal sliding window of the mask, None: none) and
    `packed` (transformers found packed sequences in the position ids; the wrapper's state holds their
    `cu_seqlens`). The prefix is never masked. `unsupported`: why the op cannot apply the mask transformers
    asked for; raised by the layers that use it, since models build masks they may not use (ModernBERT builds
    a sliding-window mask even when every layer is global)."""

    key_padding_mask: torch.Tensor | None
    causal: bool
    unsupported: str | None = None
    window: int | None = None
    packed: bool = False


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
    # transformers < 5.4 passes cache_position instead of q_length / q_offset (then the query offset is not
    # known without reading cache_position, a sync); a static cache gives q_offset as a tensor.
    offset_known = q_length is not None and not isinstance(q_offset, torch.Tensor)
    q_length, q_offset = mask_query_shape(q_length, q_offset if offset_known else None, cache_position)
    if kv_length is None:
        raise TypeError("the mask function needs kv_length")
    kv_offset = int(kv_offset or 0)
    pattern = mask_pattern(mask_function)
    if isinstance(pattern, str):
        return PrefixMask(None, True, pattern)
    # The op aligns the queries with the end of the keys it is given (a decode step sees the whole cache);
    # transformers places them at q_offset among keys kv_offset .. kv_offset + kv_length - 1.
    if pattern.causal and offset_known and q_offset - kv_offset != kv_length - q_length:
        return PrefixMask(None, True, (
            f"prefix_kernels aligns the queries with the end of the keys, but transformers puts the {q_length} "
            f"queries at position {q_offset} among keys {kv_offset}..{kv_offset + kv_length - 1} (key offset "
            f"{kv_offset}): the attention mask must cover the cached and the new tokens, and static caches are not "
            "supported (use the default DynamicCache)"))
    padding = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be 2D [batch, keys], got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] < kv_offset + kv_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, expected "
                             f"{kv_offset + kv_length}")
        # The keys the layer gets: the last kv_length ones, or, when a sliding-window cache dropped the
        # oldest kv_offset keys, keys kv_offset .. kv_offset + kv_length - 1 of the mask. Kept even when nothing
        # is padded: testing that would sync the device, and the kernels skip all-padding key blocks anyway.
        kept = attention_mask[:, kv_offset:kv_offset + kv_length] if kv_offset else attention_mask[:, -kv_length:]
        padding = kept.to(torch.bool)
    return PrefixMask(padding, pattern.causal, window=pattern.window, packed=pattern.packed)


class PrefixSource(Protocol):
    """What the attention function needs from the model that owns the prefix (its per-step state)."""

    # int64 [B] ([n] for packed sequences), values checked once per forward; None: one shared prefix
    prefix_index: torch.Tensor | None
    # int32 [n + 1]: this forward packs n sequences in its one row (checked once per forward); None: not packed
    cu_seqlens: torch.Tensor | None

    def layer_prefix(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """That layer's prefix keys and values, [Hkv, P, D] (or [T, Hkv, P, D] with prefix_index), in dtype."""

    def backend_for(self, device: torch.device, features: tuple[str, ...] = ()) -> Backend:
        """The op backend for this device and these op features (`ops.backends.features_of`), resolved once per
        (device, features) per model."""


@dataclass
class LayerBinding:
    """Put on each attention module (`module._prefix_kernels`): its model's prefix state and its slot."""

    state: PrefixSource
    slot: int


def attention_features(kwargs: dict, mask: PrefixMask | None, causal: bool, num_keys: int):
    """`(window, softcap, sinks)` for the op from the layer's keywords (`sliding_window`, `softcap`, `s_aux`) and
    its mask. transformers' eager and sdpa paths take the window from the mask, flash-attention from the
    keyword: where both say something they must agree. A window that covers every key is dropped (it hides
    nothing: `i' - j <= S - 1 < window`), so that a long window does not cost the backend choice anything."""
    window = kwargs.get("sliding_window")
    if isinstance(window, torch.Tensor):
        window = int(window)
    if mask is not None:
        if window is not None and window != mask.window:
            raise NotImplementedError(
                f"this layer passes sliding_window={window} but its mask has "
                f"{'no window' if mask.window is None else f'window {mask.window}'}: prefix_kernels cannot tell "
                "which of the two the model means")
        window = mask.window
    if window is not None:
        if not causal:
            raise NotImplementedError(f"prefix_kernels does not support bidirectional sliding-window attention "
                                      f"(sliding_window={window})")
        if window >= num_keys:
            window = None
    softcap = kwargs.get("softcap")
    if softcap is not None:
        softcap = float(softcap)
        if softcap == 0.0:  # transformers' flash path takes 0.0 for off
            softcap = None
    return window, softcap, kwargs.get("s_aux")


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
    state = binding.state
    cu_seqlens = getattr(state, "cu_seqlens", None)
    check_attention_kwargs(kwargs, packed=cu_seqlens is not None)

    mask = None
    if isinstance(attention_mask, PrefixMask):
        if attention_mask.unsupported:
            raise NotImplementedError(attention_mask.unsupported)
        mask = attention_mask
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
    B, L, S = key.shape[0], query.shape[2], key.shape[2]
    if padding is not None and tuple(padding.shape) != (B, S):
        raise ValueError(f"key padding mask must be [batch, keys] = {(B, S)}, got {tuple(padding.shape)} "
                         "(static caches are not supported; use the default DynamicCache)")
    if padding is not None and padding.device != query.device:
        padding = padding.to(query.device)
    window, softcap, sinks = attention_features(kwargs, mask, causal, S)

    if mask is not None and mask.packed and cu_seqlens is None:
        raise NotImplementedError(
            "transformers found packed sequences in position_ids (restarting inside a row), which the wrapping "
            "model did not turn into cu_seqlens: call the model through its PrefixModel, with one row (batch 1)")
    if cu_seqlens is not None:
        if B != 1 or L != S or padding is not None:
            raise NotImplementedError(
                f"packed sequences (cu_seqlens) need one row, as many keys as queries and no key padding; this layer "
                f"got batch {B}, {L} queries, {S} keys{', a key padding mask' if padding is not None else ''}")
        cu_seqlens = cu_seqlens.to(query.device)

    if scaling is None:
        scaling = module_scaling(module, query.shape[-1])
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # What SDPA does under autocast: RoPE leaves q and k in fp32 while v comes out of a bf16 matmul.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    prefix_k, prefix_v = state.layer_prefix(binding.slot, query.dtype)
    # A state serving several prefixes (MultiPrefixModel) says which one each row (each packed sequence) reads.
    prefix_index = state.prefix_index
    if prefix_index is not None:
        rows, what = (B, "rows but the batch has") if cu_seqlens is None else \
            (cu_seqlens.shape[0] - 1, "entries but the packed row holds")
        if prefix_index.shape[0] != rows:
            raise ValueError(f"prefix_index has {prefix_index.shape[0]} {what} {rows} (generate with beams or "
                             "num_return_sequences expands the batch: pass the expanded prefix_index; a packed row "
                             "takes one entry per sequence)")
        prefix_index = prefix_index.to(query.device)
    if sinks is not None and sinks.device != query.device:
        sinks = sinks.to(query.device)
    features = features_of(window=window, softcap=softcap, sinks=sinks, cu_seqlens=cu_seqlens)
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        causal=causal, key_padding_mask=padding,
        scale=scaling, dropout_p=float(dropout) if module.training else 0.0,
        prefix_index=prefix_index, window=window, softcap=softcap, sinks=sinks, cu_seqlens=cu_seqlens,
        backend=state.backend_for(query.device, features), check_prefix_index=False, check_cu_seqlens=False,
    )
    # out has the layout of query, transformers' [B, L, H, D] buffer seen as [B, H, L, D]: this transpose is the
    # contiguous [B, L, H, D] that transformers reshapes next, without a copy.
    return out.transpose(1, 2), None


def register() -> None:
    """Register the attention and mask functions (idempotent; done on import of this subpackage)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_mask_function)


register()
