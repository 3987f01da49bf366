"""The forward for few queries per KV head (decode steps, short queries): FlashAttention's flash-decoding.

`prefix_attention_fwd_decode` stacks the GROUP query heads of one KV head on the rows of one program's tile (row
r is query head `hkv * GROUP + r // L`, query `r % L`), so the KV head's prefix and sequence blocks are read once
per group, not once per query head. The key blocks a tile block sees (prefix blocks, then the visible sequence
blocks) are split over `n_splits` programs; each writes a partial out and LSE, which
`prefix_attention_fwd_decode_merge` combines. docs/kernels.md ("Decode: few queries per KV head") says when
launch.py takes this path. The key loops, masks and online softmax are those of the forward (kernels.py).
"""

import triton
import triton.language as tl

from .kernels import LN2, LOG2E, _fwd_prefix_loop, _fwd_seq_loop, _load_block, _seq_key_range, _unmasked_key_blocks


@triton.jit
def prefix_attention_fwd_decode(
    Q, K, V, PK, PV, KPM, PIDX, SINK_LOGITS, OUT, LSE, WS_O, WS_LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_kpm_b, stride_kpm_s,
    Hq, Hkv, L, S, P, n_splits, window, softcap, scale_log2,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """SPLIT: the program writes its split's fp32 partial to WS_O / WS_LSE ([B * Hq * L, n_splits, D] and
    [B * Hq * L, n_splits]): out normalized by the split's own sum, and its LSE in the log2 domain, -inf when
    the split saw no key of the row. Otherwise (one split) out and lse as prefix_attention_fwd writes them."""
    pid_bh = tl.program_id(0)  # grid (B * Hkv, tile blocks, splits): B * Hkv on the axis without a 65535 cap
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_r < GROUP * L
    h = hkv * GROUP + offs_r // L
    pos = offs_r % L  # the query position, for the causal and window rules
    offs_d = tl.arange(0, D_PAD)

    # The stacked rows are not evenly spaced in q and out (a head stride between groups of L): per-row offsets.
    q_rows = h.to(tl.int64) * stride_qh + pos.to(tl.int64) * stride_ql
    q = _load_block(Q + b * stride_qb, q_rows, 1, offs_d, stride_qd, row_valid, D, D_PAD, True)
    # int64: a long cache puts Hkv * S * D past 2**31 within one batch row.
    k_base = K + b * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hkv.to(tl.int64) * stride_vh
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + b)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh

    # The sequence keys the block's queries see, with the blocks all of them see whole (kernels.py).
    first = tl.min(tl.where(row_valid, pos, L), 0)
    stop = tl.max(tl.where(row_valid, pos, 0), 0) + 1
    seq_lo, seq_begin, seq_end = _seq_key_range(first, stop, L, S, window, BLOCK_N, CAUSAL, WINDOW)
    u_lo, u_hi = _unmasked_key_blocks(first, stop, L, S, window, seq_begin, seq_end, BLOCK_N, CAUSAL, WINDOW)
    # The split's share of the visible key blocks, numbered prefix first: [blk_lo, blk_hi).
    n_prefix = tl.cdiv(P, BLOCK_N)
    n_blocks = n_prefix + tl.cdiv(tl.maximum(seq_end - seq_begin, 0), BLOCK_N)
    blk_lo = split * n_blocks // n_splits
    blk_hi = (split + 1) * n_blocks // n_splits

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINKS:
        # The sink joins the softmax once, in split 0 (which every launch has): the merge sums the splits.
        sink = tl.load(SINK_LOGITS + h, mask=row_valid, other=0.0) * LOG2E
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # The split's prefix keys [p_lo, p_hi) read as a prefix of their own: full blocks unmasked, P's tail masked.
    p_lo = tl.minimum(blk_lo, n_prefix) * BLOCK_N
    p_hi = tl.minimum(tl.minimum(blk_hi, n_prefix) * BLOCK_N, P)
    acc, m_i, l_i = _fwd_prefix_loop(acc, m_i, l_i, q, pk_base + p_lo * stride_pkp, pv_base + p_lo * stride_pvp,
                                     stride_pkp, stride_pkd, stride_pvp, stride_pvd, tl.maximum(p_hi - p_lo, 0),
                                     scale_log2, softcap, 0, 0, 0.0, t, hkv, D, D_PAD, SOFTCAP, False,
                                     DOT_PRECISION, BLOCK_M, BLOCK_N, False)
    # Its sequence keys [s_lo, s_hi), cut into the window's band, the whole blocks and the diagonal and tail.
    s_lo = seq_begin + tl.maximum(blk_lo - n_prefix, 0) * BLOCK_N
    s_hi = tl.minimum(seq_begin + tl.maximum(blk_hi - n_prefix, 0) * BLOCK_N, seq_end)
    if WINDOW:
        acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                                      stride_vd, KPM, stride_kpm_b, stride_kpm_s, b, hkv, s_lo,
                                      tl.minimum(u_lo, s_hi), seq_lo, pos, L, S, window, scale_log2, softcap, 0, 0, 0,
                                      0.0, D, D_PAD, True, CAUSAL, WINDOW, HAS_KPM, SOFTCAP, False, DOT_PRECISION,
                                      BLOCK_N, False)
    acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  KPM, stride_kpm_b, stride_kpm_s, b, hkv, tl.maximum(u_lo, s_lo),
                                  tl.minimum(u_hi, s_hi), seq_lo, pos, L, S, window, scale_log2, softcap, 0, 0, 0,
                                  0.0, D, D_PAD, False, CAUSAL, WINDOW, HAS_KPM, SOFTCAP, False, DOT_PRECISION,
                                  BLOCK_N, False)
    acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  KPM, stride_kpm_b, stride_kpm_s, b, hkv, tl.maximum(u_hi, s_lo), s_hi, seq_lo, pos,
                                  L, S, window, scale_log2, softcap, 0, 0, 0, 0.0, D, D_PAD, True, CAUSAL, WINDOW,
                                  HAS_KPM, SOFTCAP, False, DOT_PRECISION, BLOCK_N, False)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse_rows = (b * Hq + h) * L + pos  # int64 (b is): the row's index in lse, [B, Hq, L]
    d_valid = offs_d[None, :] < D
    if SPLIT:
        ws_rows = lse_rows * n_splits + split
        tl.store(WS_LSE + ws_rows, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_i)), mask=row_valid)
        tl.store(WS_O + ws_rows[:, None] * D + offs_d[None, :], out, mask=row_valid[:, None] & d_valid)
    else:
        # +inf for rows with no visible key, as prefix_attention_fwd (zero gradients in the backward).
        tl.store(LSE + lse_rows, tl.where(empty, float("inf"), (m_i + tl.math.log2(l_i)) * LN2), mask=row_valid)
        o_rows = h.to(tl.int64) * stride_oh + pos.to(tl.int64) * stride_ol
        o_ptrs = OUT + b * stride_ob + o_rows[:, None] + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & d_valid)


@triton.jit
def prefix_attention_fwd_decode_merge(
    WS_O, WS_LSE, OUT, LSE,
    stride_ob, stride_oh, stride_ol, stride_od,
    Hq, L, n_rows, n_splits,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out and lse of BLOCK_M queries of [B * Hq * L] from the splits' partials (out_split, lse_split):
    lse = log(sum exp(lse_split)), out = sum exp(lse_split - lse) out_split. A split that saw no key has
    lse_split = -inf and weighs 0; a query no split saw gets out = 0 and lse = +inf, as prefix_attention_fwd
    gives it."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # grid (blocks of BLOCK_M queries,)
    row_valid = rows < n_rows
    offs_d = tl.arange(0, D_PAD)
    d_valid = offs_d[None, :] < D
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(n_splits):
        m = tl.maximum(m, tl.load(WS_LSE + rows * n_splits + split, mask=row_valid, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights exp2(-inf) = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for split in range(n_splits):
        ws_rows = rows * n_splits + split
        w = tl.math.exp2(tl.load(WS_LSE + ws_rows, mask=row_valid, other=float("-inf")) - m_safe)
        o = tl.load(WS_O + ws_rows[:, None] * D + offs_d[None, :], mask=row_valid[:, None] & d_valid, other=0.0)
        l_i += w
        acc += w[:, None] * o
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(LSE + rows, tl.where(empty, float("inf"), (m_safe + tl.math.log2(l_i)) * LN2), mask=row_valid)
    b = rows // (Hq * L)
    h = (rows // L) % Hq
    pos = rows % L
    o_ptrs = OUT + (b * stride_ob + h * stride_oh + pos * stride_ol)[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & d_valid)
