"""`prefix_attention`: the public op (docs/op.md). Validates once, resolves a backend, calls its op."""

from __future__ import annotations

import torch

from .backends import Backend, features_of, resolve_backend
from .dropout import draw_seed
from .validation import validate


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    prefix_index: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | Backend | None = None,
    deterministic: bool = True,
    check_prefix_index: bool = True,
    check_cu_seqlens: bool = True,
) -> torch.Tensor:
    """Attention of `q` over `[shared prefix keys] + [per-sequence keys]`, without copying the prefix.

    Args:
        q: `[B, Hq, L, D]` queries, any strides.
        k, v: `[B, Hkv, S, D]` sequence keys and values (S may exceed L, e.g. a KV cache in decoding).
        prefix_k, prefix_v: `[Hkv, P, D]` shared by every row, or `[T, Hkv, P, D]` with `prefix_index`.
        causal: query i sees sequence key j iff j <= i + (S - L); every query sees every prefix key.
        key_padding_mask: bool `[B, S]`, True = real token. The prefix is never masked.
        scale: softmax scale, default `D ** -0.5`.
        dropout_p: dropout on the attention probabilities (pass 0.0 in evaluation).
        prefix_index: int64 `[B]` (`[n]` with cu_seqlens), which of the T prefixes each row (each packed
            sequence) uses.
        window: sliding window: query i also needs i' - j < window to see sequence key j (i' = i + S - L, its
            position among the keys). The prefix stays visible to every query.
        softcap: scores become `softcap * tanh(scores / softcap)` (prefix and sequence keys alike).
        sinks: `[Hq]` one logit per query head that joins the softmax denominator without a value (GPT-OSS).
        cu_seqlens: int32 `[n + 1]`, packed sequences: B = 1, L = S, and the queries at positions
            [cu_seqlens[s], cu_seqlens[s + 1]) see the prefix and the keys of their own sequence only.
        backend: "triton", "cuda", "cpu", "reference", a `Backend` record from `resolve_backend`, or None
            (fastest available; the environment variable PREFIX_KERNELS_BACKEND overrides the default).
        deterministic: prefix gradients are summed over the batch in a fixed order (default). False lets
            the triton backend use fp32 atomics, faster with few prefix blocks but not bitwise repeatable (for
            dq too under PREFIX_KERNELS_TRITON_BWD=atomic, which refuses deterministic=True).
        check_prefix_index: check that the values of `prefix_index` lie in [0, T) (one device sync). A
            caller that checked them once for many calls (the transformers integration) passes False.
        check_cu_seqlens: check that cu_seqlens starts at 0, ends at S and never decreases (one device sync).

    Returns:
        `[B, Hq, L, D]` in the dtype and memory layout of q (for q a transposed `[B, L, Hq, D]` buffer,
        `out.transpose(1, 2)` is contiguous).
    """
    validate(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
             dropout_p=dropout_p, prefix_index=prefix_index, window=window, softcap=softcap, sinks=sinks,
             cu_seqlens=cu_seqlens, check_index_values=check_prefix_index, check_cu_seqlens=check_cu_seqlens)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    features = features_of(window=window, softcap=softcap, sinks=sinks, cu_seqlens=cu_seqlens)
    record = resolve_backend(backend, q.device, features)
    if q.dtype == torch.float64 and record.name != "reference":
        raise TypeError(f"float64 inputs are supported by the reference backend only, not {record.name!r}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    dropout_p = float(dropout_p)
    seed = draw_seed(dropout_p) if dropout_p > 0.0 else 0
    out, _lse = record.fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal,
                           int(window or 0), float(softcap or 0.0), scale, dropout_p, seed, deterministic)
    return out
