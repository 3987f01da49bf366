"""The `reference` backend: the op's semantics (docs/op.md) written the way PEFT users run them today.

The shared prefix is expanded to every batch row and concatenated in front of the sequence keys, GQA heads
are repeated, and a dense mask is built over the P + S keys. That copy is exactly what the fused backends
remove, so `reference_prefix_attention` is both the oracle of every test (run it on float64 inputs, autograd
through plain torch ops) and the eager baseline of the benchmarks (run it in the model's dtype). Soft-capping,
sinks and windows are applied as transformers' eager attention applies them; packed sequences
(`cu_seqlens`) are attended one sequence at a time, each as a row of its own.

`reference_fwd` is the backend's forward op, registered as a composite: under autograd it decomposes into
these torch ops, so the `reference` backend costs what eager attention over a concatenated prefix costs
(the probabilities are kept for backward, dropout draws torch's Bernoulli from the call's seed) and stays
the honest baseline. `reference_bwd` (the textbook formulas) completes the op pair for direct callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dropout import draw_seed, dropout_keep_mask
from .masks import sequence_spans, visible_keys


@dataclass(frozen=True)
class Features:
    """The options that change which keys a query sees or how it scores them (docs/op.md)."""

    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


def _segments(q, k, v, key_padding_mask, prefix_index, cu_seqlens, dropout_mask, P):
    """The independent problems of one call, as (positions, q, k, v, key_padding_mask, prefix_index,
    dropout_mask): the whole batch, or each packed sequence as a row of its own (its slice of the keep mask
    is its rows and its own key columns, prefix first)."""
    if cu_seqlens is None:
        return [(slice(None), q, k, v, key_padding_mask, prefix_index, dropout_mask)]
    segments = []
    for n, (a, b) in enumerate(sequence_spans(cu_seqlens)):
        if a == b:
            continue
        mask = None if dropout_mask is None else torch.cat(
            [dropout_mask[:, :, a:b, :P], dropout_mask[:, :, a:b, P + a:P + b]], dim=-1)
        index = None if prefix_index is None else prefix_index[n:n + 1]
        segments.append((slice(a, b), q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, index, mask))
    return segments


def _keys(prefix, seq, prefix_index, group):
    return torch.cat([_expand_prefix(prefix, prefix_index, seq.shape[0]), seq], dim=2).repeat_interleave(group, dim=1)


def _probabilities(q, k, prefix_k, key_padding_mask, prefix_index, scale, f: Features, dtype):
    """Softmax over the visible keys (and the sink) of one problem: probabilities `[B, Hq, L, P + S]` in
    `dtype`, fp32 lse `[B, Hq, L]`, and tanh(scores / softcap) (None without softcap) for the backward."""
    B, Hq, L, _ = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    keys = _keys(prefix_k, k, prefix_index, Hq // Hkv)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    tanh = None
    if f.softcap is not None:
        tanh = torch.tanh(scores / f.softcap)
        scores = f.softcap * tanh
    visible = visible_keys(B, L, S, P, causal=f.causal, key_padding_mask=key_padding_mask, device=q.device,
                           window=f.window)
    scores = scores.masked_fill(~visible, float("-inf"))
    if f.sinks is not None:
        scores = torch.cat([scores, f.sinks.to(scores.dtype).view(1, Hq, 1, 1).expand(B, Hq, L, 1)], dim=-1)
    # A row with no visible key (P = 0, no sink) outputs zeros, not the NaN softmax would give.
    any_visible = visible.any(dim=-1, keepdim=True) | (f.sinks is not None)
    scores = torch.where(any_visible, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    with torch.no_grad():  # for the op's contract only; no gradient flows through it
        lse = torch.logsumexp(scores.float(), dim=-1)
        lse = torch.where(any_visible.squeeze(-1), lse, torch.full_like(lse, float("inf")))
    probs = torch.softmax(scores, dim=-1, dtype=dtype) * any_visible
    if f.sinks is not None:
        probs = probs[..., :-1]  # the sink takes its share of the mass and carries no value
    return probs, lse, tanh


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
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Attention of q over [prefix keys] + [sequence keys], by expand + cat + softmax (differentiable).

    Works in the dtype of its inputs (scores in that dtype, softmax in at least fp32, like transformers'
    eager attention); pass float64 inputs for the oracle. Dropout keeps what the fused backends keep for
    `seed` (a fresh seed when None); `dropout_mask` (bool `[B, Hq, L, P + S]`, True = kept) replays a given
    pattern instead.
    """
    if dropout_p > 0.0 and dropout_mask is None:
        B, Hq, L, _ = q.shape
        dropout_mask = dropout_keep_mask(B, Hq, L, prefix_k.shape[-2], k.shape[2], dropout_p,
                                         draw_seed(dropout_p) if seed is None else seed, q.device)
    f = Features(causal, window, softcap, sinks)
    out, _ = _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, f, scale,
                        dropout_p, dropout_mask)
    return out


def reference_lse(q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask, scale, prefix_index, window=None,
                  softcap=None, sinks=None, cu_seqlens=None) -> torch.Tensor:
    """fp32 `[B, Hq, L]` log-sum-exp of each row's visible scores and sink (natural log, +inf for an empty row)."""
    f = Features(causal, window, softcap, sinks)
    return _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, f, scale, 0.0,
                      None)[1]


def _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, f, scale, dropout_p,
               dropout_mask):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for _, qs, ks, vs, kpm, index, mask in _segments(q, k, v, key_padding_mask, prefix_index, cu_seqlens,
                                                      dropout_mask, prefix_k.shape[-2]):
        probs, lse, _ = _probabilities(qs, ks, prefix_k, kpm, index, scale, f, softmax_dtype)
        probs = probs.to(q.dtype)
        if dropout_p > 0.0:
            probs = probs * mask / (1.0 - dropout_p)
        outs.append(torch.matmul(probs, _keys(prefix_v, vs, index, group)))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _keep_mask(q, k, prefix_k, dropout_p, seed):
    # The kernels' Philox stream costs ~100 integer ops per probability in torch; eager attention's dropout is
    # one Bernoulli draw, and a generator seeded by the call's seed replays it. A generator draws concrete
    # shapes only, so a traced call specializes on them.
    B, Hq, L, _ = q.shape
    shape = tuple(int(n) for n in (B, Hq, L, prefix_k.shape[-2] + k.shape[2]))  # traced: specialized
    generator = torch.Generator(device=q.device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=q.device) >= dropout_p


def _features(causal, window, softcap, sinks) -> Features:
    """The op schema's encoding (window 0 and softcap 0.0 mean off) as Features."""
    return Features(causal, window or None, softcap or None, sinks)


def reference_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal, window,
                  softcap, scale, dropout_p, seed, deterministic):
    mask = _keep_mask(q, k, prefix_k, dropout_p, seed) if dropout_p > 0.0 else None
    out, lse = _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens,
                          _features(causal, window, softcap, sinks), scale, dropout_p, mask)
    return torch.empty_like(q).copy_(out), lse


def reference_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, cu_seqlens,
                  sinks, causal, window, softcap, scale, dropout_p, seed, deterministic, output_mask):
    """The gradients by the textbook formulas on the recomputed probabilities (no autograd: an op's kernel runs
    below the autograd key, e.g. under a dispatch mode). With Z the kept/(1 - p) dropout factors:
    dV = (P Z)^T dO, dP = (dO V^T) Z, dS = P (dP - rowsum(dO O)) (times 1 - tanh^2 under softcap),
    dQ = s dS K, dK = s dS^T Q; the prefix and GQA parts are summed back from the expanded keys. The sinks'
    gradient is not an output of the op: the autograd formula derives it from lse (library.py)."""
    wants = (output_mask[0], output_mask[1], output_mask[2])
    if not any(wants):
        return tuple(t.new_empty((0,)) for t in (q, k, v, prefix_k, prefix_v))
    f = _features(causal, window, softcap, sinks)
    Hq, D = q.shape[1], q.shape[3]
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    group = Hq // Hkv
    work = torch.promote_types(q.dtype, torch.float32)
    factor = _keep_mask(q, k, prefix_k, dropout_p, seed).to(work) / (1.0 - dropout_p) if dropout_p > 0.0 else None
    dq, dk, dv = (torch.zeros(t.shape, dtype=work, device=t.device) for t in (q, k, v))
    dpk, dpv = (torch.zeros(prefix_k.shape, dtype=work, device=q.device) for _ in range(2))
    for rows, qs, ks, vs, kpm, index, z in _segments(q, k, v, key_padding_mask, prefix_index, cu_seqlens, factor, P):
        B, S = qs.shape[0], ks.shape[2]
        # Recomputed as the forward did (the fp32 lse would cap a float64 oracle at fp32 precision).
        probs, _, tanh = _probabilities(qs, ks, prefix_k, kpm, index, scale, f, work)
        do = grad_out[:, :, rows].to(work)
        dp = torch.matmul(do, _keys(prefix_v, vs, index, group).to(work).transpose(-1, -2))
        if z is not None:
            dp = dp * z
        ds = probs * (dp - (do * out[:, :, rows].to(work)).sum(-1, keepdim=True))
        if tanh is not None:
            ds = ds * (1 - tanh.to(work) ** 2)
        dq[:, :, rows] = torch.matmul(ds, _keys(prefix_k, ks, index, group).to(work)) * scale
        # Back to KV heads, then split prefix and sequence columns.
        dkeys = (torch.matmul(ds.transpose(-1, -2), qs.to(work)) * scale).view(B, Hkv, group, P + S, D).sum(2)
        dvalues = torch.matmul((probs if z is None else probs * z).transpose(-1, -2), do)
        dvalues = dvalues.view(B, Hkv, group, P + S, D).sum(2)
        dk[:, :, rows], dv[:, :, rows] = dkeys[:, :, P:], dvalues[:, :, P:]
        dpk += _reduce_prefix(dkeys[:, :, :P], prefix_k, index)
        dpv += _reduce_prefix(dvalues[:, :, :P], prefix_v, index)
    grads = (dq, dk, dv, dpk, dpv)
    kept = (wants[0], wants[1], wants[1], wants[2], wants[2])
    return tuple(torch.empty_like(t).copy_(g) if w else t.new_empty((0,))
                 for t, g, w in zip((q, k, v, prefix_k, prefix_v), grads, kept))


def _expand_prefix(prefix, prefix_index, B):
    return prefix.unsqueeze(0).expand(B, -1, -1, -1) if prefix_index is None else prefix[prefix_index]


def _reduce_prefix(per_row, prefix, prefix_index):
    """Sum per-row prefix gradients [B, Hkv, P, D] over the rows that use each prefix."""
    if prefix_index is None:
        return per_row.sum(0)
    total = per_row.new_zeros(prefix.shape)
    return total.index_add_(0, prefix_index, per_row)
