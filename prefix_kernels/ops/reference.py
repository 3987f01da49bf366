"""The `reference` backend: the op's semantics (docs/op.md) written the way PEFT users run them today.

The shared prefix is expanded to every batch row and concatenated in front of the sequence keys, GQA heads
are repeated, and a dense mask is built over the P + S keys. That copy is exactly what the fused backends
remove, so `reference_prefix_attention` is both the oracle of every test (run it on float64 inputs, autograd
through plain torch ops) and the eager baseline of the benchmarks (run it in the model's dtype).

`reference_fwd` is the backend's forward op, registered as a composite: under autograd it decomposes into
these torch ops, so the `reference` backend costs what eager attention over a concatenated prefix costs
(the probabilities are kept for backward, dropout draws torch's Bernoulli from the call's seed) and stays
the honest baseline. `reference_bwd` (the textbook formulas) completes the op pair for direct callers.
"""

from __future__ import annotations

import torch

from .dropout import draw_seed, dropout_keep_mask
from .masks import visible_keys


def _scores_and_values(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, prefix_index):
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    pk, pv = _expand_prefix(prefix_k, prefix_index, B), _expand_prefix(prefix_v, prefix_index, B)
    P = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(group, dim=1)
    visible = visible_keys(B, L, S, P, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    return scores.masked_fill(~visible, float("-inf")), visible, values


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
    out, _ = _attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, prefix_index, dropout_p,
                        dropout_mask, with_lse=False)
    return out


def reference_lse(q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask, scale, prefix_index) -> torch.Tensor:
    """fp32 `[B, Hq, L]` log-sum-exp of each row's visible scores (natural log, +inf for an empty row)."""
    return _attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, prefix_index, 0.0, None,
                      with_lse=True)[1]


def _attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, prefix_index, dropout_p,
               dropout_mask, with_lse):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores, visible, values = _scores_and_values(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale,
                                                 prefix_index)
    # A row with no visible key (only possible when P = 0) outputs zeros, not the NaN softmax would give.
    any_visible = visible.any(dim=-1, keepdim=True)
    scores = torch.where(any_visible, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    lse = None
    if with_lse:  # for the op's contract only; no gradient flows through it
        with torch.no_grad():
            lse = torch.logsumexp(scores.float(), dim=-1)
            lse = torch.where(any_visible.squeeze(-1), lse, torch.full_like(lse, float("inf")))
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    probs = (torch.softmax(scores, dim=-1, dtype=softmax_dtype) * any_visible).to(q.dtype)
    if dropout_p > 0.0:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return torch.matmul(probs, values), lse


def _keep_mask(q, k, prefix_k, dropout_p, seed):
    # The kernels' Philox stream costs ~100 integer ops per probability in torch; eager attention's dropout is
    # one Bernoulli draw, and a generator seeded by the call's seed replays it. A generator draws concrete
    # shapes only, so a traced call specializes on them.
    B, Hq, L, _ = q.shape
    shape = tuple(int(n) for n in (B, Hq, L, prefix_k.shape[-2] + k.shape[2]))  # traced: specialized
    generator = torch.Generator(device=q.device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=q.device) >= dropout_p


def reference_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed,
                  deterministic):
    mask = _keep_mask(q, k, prefix_k, dropout_p, seed) if dropout_p > 0.0 else None
    out, lse = _attention(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, prefix_index, dropout_p,
                          mask, with_lse=True)
    return torch.empty_like(q).copy_(out), lse


def reference_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, causal, scale,
                  dropout_p, seed, deterministic, output_mask):
    """The gradients by the textbook formulas on the recomputed probabilities (no autograd: an op's kernel runs
    below the autograd key, e.g. under a dispatch mode). With Z the kept/(1 - p) dropout factors:
    dV = (P Z)^T dO, dP = (dO V^T) Z, dS = P (dP - rowsum(dO O)), dQ = s dS K, dK = s dS^T Q; the prefix and
    GQA parts are summed back from the expanded keys."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P, group = prefix_k.shape[-2], Hq // Hkv
    wants = (output_mask[0], output_mask[1], output_mask[2])
    if not any(wants):
        return tuple(t.new_empty((0,)) for t in (q, k, v, prefix_k, prefix_v))
    scores, visible, values = _scores_and_values(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale,
                                                 prefix_index)
    work = torch.promote_types(q.dtype, torch.float32)
    # Recomputed as the forward did (the fp32 lse would cap a float64 oracle at fp32 precision).
    any_visible = visible.any(dim=-1, keepdim=True)
    scores = torch.where(any_visible, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.softmax(scores, dim=-1, dtype=work) * any_visible
    keys = torch.cat([_expand_prefix(prefix_k, prefix_index, B), k], dim=2).repeat_interleave(group, dim=1)
    do = grad_out.to(work)
    factor = _keep_mask(q, k, prefix_k, dropout_p, seed).to(work) / (1.0 - dropout_p) if dropout_p > 0.0 else None
    dp = torch.matmul(do, values.to(work).transpose(-1, -2))
    if factor is not None:
        dp = dp * factor
    ds = probs * (dp - (do * out.to(work)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, keys.to(work)) * scale if wants[0] else None
    dkeys = torch.matmul(ds.transpose(-1, -2), q.to(work)) * scale  # [B, Hq, P + S, D]
    dvalues = torch.matmul((probs if factor is None else probs * factor).transpose(-1, -2), do)
    # Back to KV heads, then split prefix and sequence columns.
    dkeys = dkeys.view(B, Hkv, group, P + S, D).sum(2)
    dvalues = dvalues.view(B, Hkv, group, P + S, D).sum(2)
    dk, dv = (dkeys[:, :, P:], dvalues[:, :, P:]) if wants[1] else (None, None)
    dpk = dpv = None
    if wants[2]:
        dpk, dpv = (_reduce_prefix(g[:, :, :P], prefix_k, prefix_index) for g in (dkeys, dvalues))
    grads = (dq, dk, dv, dpk, dpv)
    return tuple(t.new_empty((0,)) if g is None else torch.empty_like(t).copy_(g)
                 for t, g in zip((q, k, v, prefix_k, prefix_v), grads))


def _expand_prefix(prefix, prefix_index, B):
    return prefix.unsqueeze(0).expand(B, -1, -1, -1) if prefix_index is None else prefix[prefix_index]


def _reduce_prefix(per_row, prefix, prefix_index):
    """Sum per-row prefix gradients [B, Hkv, P, D] over the rows that use each prefix."""
    if prefix_index is None:
        return per_row.sum(0)
    total = per_row.new_zeros(prefix.shape)
    return total.index_add_(0, prefix_index, per_row)
