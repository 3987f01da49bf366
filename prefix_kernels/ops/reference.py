"""The `reference` backend: DESIGN.md's semantics written the way PEFT users run them today.

The shared prefix is expanded to every batch row and concatenated in front of the sequence keys, GQA heads
are repeated, and a dense mask is built over the P + S keys. That copy is exactly what the fused backends
remove, so this module is both the oracle of every test (run it on float64 inputs) and the baseline of every
benchmark (run it in the model's dtype).
"""

from __future__ import annotations

import torch

from .masks import visible_keys


def reference_prefix_attention(
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
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q over [prefix keys] + [sequence keys], by expand + cat + softmax.

    Works in the dtype of its inputs (scores in that dtype, softmax in at least fp32, like transformers'
    eager attention); pass float64 inputs for the oracle. `dropout_mask` (bool `[B, Hq, L, P + S]`, True =
    kept) replays a given dropout pattern so tests can compare against a backend's own random mask.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D**-0.5 if scale is None else scale

    if prefix_index is None:
        pk = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        pv = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    else:
        pk, pv = prefix_k[prefix_index], prefix_v[prefix_index]
    P = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(group, dim=1)

    visible = visible_keys(B, L, S, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key (only possible when P = 0) outputs zeros, not the NaN softmax would give.
    any_visible = visible.any(dim=-1, keepdim=True)
    scores = torch.where(any_visible, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype) * any_visible
    probs = probs.to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, values)
