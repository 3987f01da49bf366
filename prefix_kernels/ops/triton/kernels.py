"""Triton kernels for attention over [shared prefix] + [sequence] (docs/op.md).

Every kernel walks the P prefix keys of its row's prefix (no batch offset: `prefix_index` picks it) and then
the S sequence keys, with one online softmax over both. Scores live in the log2 domain
(`qk * scale * log2(e)`) so that `exp2` is used throughout; the stored LSE is in natural-log units.

Launch glue lives in `launch.py`, tile configs in `configs.py` beside this file.
"""

import triton
import triton.language as tl

from .configs import autotuned_kernel

# Globals read inside @triton.jit code must be constexpr (the interpreter would accept plain floats).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _dropout_keep(seed, row_offset, cols, dropout_p):
    # One Philox draw per (row, key column): the backward regenerates exactly the forward's mask, and the
    # C++ backends use the same generator, so every backend drops the same probabilities.
    offsets = row_offset[:, None] + cols[None, :].to(tl.int64)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _load_block(base, offs_rows, stride_row, offs_d, stride_d, row_mask, D: tl.constexpr):
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, S, HAS_KPM: tl.constexpr):
    valid = cols < S
    if HAS_KPM:
        real = tl.load(KPM + b * stride_kpm_b + cols * stride_kpm_s, mask=valid, other=0)
        valid = valid & (real != 0)
    return valid


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, seed, row_offset, cols, dropout_p,
               DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 NaN-free.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, row_offset, cols, dropout_p), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _causal_seq_end(start_m, L, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # One past the last sequence key any query of this block may see (bottom-right aligned causal mask).
    if CAUSAL:
        return tl.minimum(S, tl.maximum(start_m + BLOCK_M + S - L, 0))
    return S


@autotuned_kernel("fwd")
@triton.jit
def prefix_attention_fwd(
    Q, K, V, PK, PV, KPM, PIDX, OUT, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_kpm_b, stride_kpm_s,
    Hq, L, S, P, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # int64 row offsets: B * stride_b may exceed 2**31 (long KV caches)
    h = pid_bh % Hq
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < L

    q = _load_block(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + b)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    row_offset = (pid_bh.to(tl.int64) * L + offs_m) * (P + S)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < P
        k = _load_block(pk_base, cols, stride_pkp, offs_d, stride_pkd, col_valid, D)
        v = _load_block(pv_base, cols, stride_pvp, offs_d, stride_pvd, col_valid, D)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, col_valid[None, :], scale_log2, seed, row_offset,
                                   cols, dropout_p, DROPOUT, DOT_PRECISION)

    seq_end = _causal_seq_end(start_m, L, S, BLOCK_M, CAUSAL)
    for start_n in range(0, seq_end, BLOCK_N):
        cols = start_n + offs_n
        visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, S, HAS_KPM)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + (S - L))
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, cols < S, D)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, cols < S, D)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, seed, row_offset, P + cols,
                                   dropout_p, DROPOUT, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    # +inf for rows with no visible key makes exp(s - lse) exactly 0 in the backward (zero gradients).
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_i)) * LN2)
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=row_valid)
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def prefix_attention_bwd_preprocess(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    Hq, L,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < L
    o = _load_block(OUT + b * stride_ob + h * stride_oh, offs_m, stride_ol, offs_d, stride_od, row_valid, D)
    do = _load_block(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, offs_d, stride_dod, row_valid, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * L + offs_m, delta, mask=row_valid)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, seed, row_offset, cols, dropout_p,
              DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.where(visible, tl.math.exp2(qk - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, row_offset, cols, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@autotuned_kernel("bwd_dq")
@triton.jit
def prefix_attention_bwd_dq(
    Q, K, V, PK, PV, KPM, PIDX, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_kpm_b, stride_kpm_s,
    Hq, L, S, P, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hkv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < L

    q = _load_block(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
    do = _load_block(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, offs_d, stride_dod, row_valid, D)
    lse2 = tl.load(LSE + pid_bh * L + offs_m, mask=row_valid, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_valid, other=0.0)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + b)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    row_offset = (pid_bh.to(tl.int64) * L + offs_m) * (P + S)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < P
        k = _load_block(pk_base, cols, stride_pkp, offs_d, stride_pkd, col_valid, D)
        v = _load_block(pv_base, cols, stride_pvp, offs_d, stride_pvd, col_valid, D)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, col_valid[None, :], scale_log2, seed, row_offset, cols,
                       dropout_p, DROPOUT, DOT_PRECISION)

    seq_end = _causal_seq_end(start_m, L, S, BLOCK_M, CAUSAL)
    for start_n in range(0, seq_end, BLOCK_N):
        cols = start_n + offs_n
        visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, S, HAS_KPM)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + (S - L))
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, cols < S, D)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, cols < S, D)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, seed, row_offset, P + cols,
                       dropout_p, DROPOUT, DOT_PRECISION)

    dq = dq * (scale_log2 * LN2)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, seed, row_offset, cols, dropout_p,
                DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dk and dv accumulate without transposing them back.
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    p_t = tl.where(visible_t, tl.math.exp2(qk_t - lse2[None, :]), 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep_t = tl.trans(_dropout_keep(seed, row_offset, cols, dropout_p))
        rescale = 1.0 / (1.0 - dropout_p)
        dv += tl.dot((tl.where(keep_t, p_t * rescale, 0.0)).to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.where(keep_t, dp_t * rescale, 0.0)
    else:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@autotuned_kernel("bwd_dkdv")
@triton.jit
def prefix_attention_bwd_dkdv(
    Q, K, V, KPM, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_kpm_b, stride_kpm_s,
    Hq, Hkv, L, S, P, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of the sequence keys/values: one program owns one key block of one (row, KV head)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_valid = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, S, HAS_KPM)
    k = _load_block(K + b * stride_kb + hkv * stride_kh, cols, stride_ks, offs_d, stride_kd, cols < S, D)
    v = _load_block(V + b * stride_vb + hkv * stride_vh, cols, stride_vs, offs_d, stride_vd, cols < S, D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # Causal: queries before start_n - (S - L) see none of these keys, so their blocks are skipped; a key
    # block that is all padding (left-padded batches) skips every query block and stores zeros.
    first_m = 0
    if CAUSAL:
        first_m = (tl.maximum(start_n - (S - L), 0) // BLOCK_M) * BLOCK_M
    if HAS_KPM:
        first_m = tl.where(tl.max(col_valid.to(tl.int32), 0) > 0, first_m, L)
    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        for start_m in range(first_m, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_valid = offs_m < L
            q = _load_block(q_base, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
            do = _load_block(do_base, offs_m, stride_dol, offs_d, stride_dod, row_valid, D)
            lse2 = tl.load(LSE + bh * L + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_valid, other=0.0)
            visible_t = col_valid[:, None] & row_valid[None, :]
            if CAUSAL:
                visible_t = visible_t & (cols[:, None] <= offs_m[None, :] + (S - L))
            row_offset = (bh.to(tl.int64) * L + offs_m) * (P + S)
            dk, dv = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, seed, row_offset,
                                 P + cols, dropout_p, DROPOUT, DOT_PRECISION)

    dk = dk * (scale_log2 * LN2)
    d_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=d_mask)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=d_mask)


@autotuned_kernel("bwd_dprefix")
@triton.jit
def prefix_attention_bwd_dprefix(
    Q, PK, PV, PIDX, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    B, Hq, Hkv, L, S, P, T, n_splits, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Prefix gradients, reduced over every (batch row, query head of the group, query block).

    Those units are split into `n_splits` contiguous chunks, one program per (prefix key block, prefix,
    KV head, chunk). Each chunk's fp32 sum goes to its own slice of DPK/DPV ([n_splits, T, Hkv, P, D]) and
    the host sums the slices in a fixed order: deterministic. With ATOMIC the chunks add into one fp32
    [T, Hkv, P, D] buffer instead: less memory traffic, but the summation order varies from run to run.
    """
    pid_n = tl.program_id(0)
    pid_th = tl.program_id(1)
    split = tl.program_id(2)
    t = pid_th // Hkv
    hkv = pid_th % Hkv
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    col_valid = cols < P
    k = _load_block(PK + t * stride_pkt + hkv * stride_pkh, cols, stride_pkp, offs_d, stride_pkd, col_valid, D)
    v = _load_block(PV + t * stride_pvt + hkv * stride_pvh, cols, stride_pvp, offs_d, stride_pvd, col_valid, D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    n_m = tl.cdiv(L, BLOCK_M)
    units = B * GROUP * n_m
    unit_lo = (split * units) // n_splits
    unit_hi = ((split + 1) * units) // n_splits
    for unit in range(unit_lo, unit_hi):
        b = (unit // (GROUP * n_m)).to(tl.int64)
        g = (unit // n_m) % GROUP
        start_m = (unit % n_m) * BLOCK_M
        uses_prefix = True
        if MULTI_PREFIX:
            uses_prefix = tl.load(PIDX + b) == t
        if uses_prefix:
            h = hkv * GROUP + g
            bh = b * Hq + h
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_valid = offs_m < L
            q = _load_block(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
            do = _load_block(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, offs_d, stride_dod,
                             row_valid, D)
            lse2 = tl.load(LSE + bh * L + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_valid, other=0.0)
            row_offset = (bh.to(tl.int64) * L + offs_m) * (P + S)
            dk, dv = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, col_valid[:, None] & row_valid[None, :],
                                 scale_log2, seed, row_offset, cols, dropout_p, DROPOUT, DOT_PRECISION)

    dk = dk * (scale_log2 * LN2)
    # DPK/DPV are contiguous fp32 buffers [n_splits or 1, T, Hkv, P, D].
    slot = (t * Hkv + hkv) * P
    if not ATOMIC:
        slot += split * (T * Hkv * P)
    offs = (slot + cols[:, None]) * D + offs_d[None, :]
    d_mask = col_valid[:, None] & (offs_d[None, :] < D)
    if ATOMIC:
        tl.atomic_add(DPK + offs, dk, mask=d_mask)
        tl.atomic_add(DPV + offs, dv, mask=d_mask)
    else:
        tl.store(DPK + offs, dk, mask=d_mask)
        tl.store(DPV + offs, dv, mask=d_mask)


@triton.jit
def prefix_attention_dropout_mask(KEEP, L, P, S, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask [B, Hq, L, P + S] the attention kernels draw for `seed` (for tests)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offset = (pid_bh.to(tl.int64) * L + offs_m) * (P + S)
    keep = _dropout_keep(seed, row_offset, cols, dropout_p)
    ptrs = KEEP + row_offset[:, None] + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (cols[None, :] < P + S))
