"""Triton kernels for attention over [shared prefix] + [sequence] (docs/op.md).

Every kernel walks the P prefix keys of its row's prefix (no batch offset: `prefix_index` picks it) and then
the S sequence keys, with one online softmax over both. Scores live in the log2 domain
(`qk * scale * log2(e)`) so that `exp2` is used throughout; the stored LSE is in natural-log units.

The optional features are constexpr flags, so a call without them compiles the plain kernels: WINDOW (a
sliding window over the sequence keys), SOFTCAP (`softcap * tanh(s / softcap)` on the natural-scale scores),
SINKS (one logit per query head in the denominator, forward only: the backward reads it through the LSE) and
PACKED (`cu_seqlens`: each program works inside one packed sequence, see `_packed_sequence`).

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
def _tanh(x):
    # Not every Triton has tl.tanh; this form saturates to +-1 for large |x| (exp2 -> inf or 0), never NaN.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _scores(q, k, scale_log2, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Log2-domain scores of q against k, and tanh(s / softcap) (the backward's 1 - tanh^2) under SOFTCAP.

    The cap applies to the natural-scale scores s = qk * scale; scale_log2 = scale * log2(e)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        th = _tanh(qk * (scale_log2 / (softcap * LOG2E)))
        return th * (softcap * LOG2E), th
    return qk * scale_log2, qk


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap, seed, row_offset, cols, dropout_p,
               SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk, _ = _scores(q, k, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
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


@triton.jit
def _seq_key_range(start_m, L, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   WINDOW: tl.constexpr):
    """(first key any query of this block sees, the key block it lies in, one past the last key).

    The queries of a block see a contiguous range of keys: the window's lower bound follows the block's first
    query, the causal bound its last one. Key blocks outside the range are never visited, and keys of the
    first block below the range are never loaded."""
    lo = 0
    if WINDOW:
        lo = tl.maximum(start_m + (S - L) - window + 1, 0)
    return lo, (lo // BLOCK_N) * BLOCK_N, _causal_seq_end(start_m, L, S, BLOCK_M, CAUSAL)


@triton.jit
def _in_view(visible, rows, cols, shift, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # docs/op.md's rule (masks.py), for broadcastable query rows and key columns; shift = S - L.
    if CAUSAL:
        visible = visible & (cols <= rows + shift)
    if WINDOW:
        visible = visible & (rows + shift - cols < window)
    return visible


@triton.jit
def _packed_sequence(CU_SEQLENS, pid, n_seqs, BLOCK: tl.constexpr):
    """(sequence, block index within it, its start, its length) of program `pid` of a packed launch.

    Sequence s owns the programs [cu[s] // BLOCK + s, cu[s + 1] // BLOCK + s + 1): at least its
    cdiv(len, BLOCK) blocks, one spare at most (it exits at once). So the grid is L // BLOCK + n programs
    whatever the lengths are, and the host never reads cu_seqlens (no device sync for the longest sequence).
    A binary search finds the sequence: the first program of s grows with s."""
    lo = pid * 0
    hi = lo + n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(CU_SEQLENS + mid) // BLOCK + mid <= pid
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    start = tl.load(CU_SEQLENS + lo)
    length = tl.load(CU_SEQLENS + lo + 1) - start
    return lo, pid - (start // BLOCK + lo), start, length


@autotuned_kernel("fwd")
@triton.jit
def prefix_attention_fwd(
    Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, SINK_LOGITS, OUT, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_kpm_b, stride_kpm_s,
    Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # int64 row offsets: B * stride_b may exceed 2**31 (long KV caches)
    h = pid_bh % Hq
    hkv = h // GROUP
    # Packed: the program's sequence is a row of its own (L = S = its length) at offset `first` of the one
    # row; `first` also places its rows and keys in the LSE and in the dropout counters of the packed row.
    first = 0
    Ls = L
    Ss = S
    row_sel = b
    if PACKED:
        seq, pid_m, first, Ls = _packed_sequence(CU_SEQLENS, pid_m, n_seqs, BLOCK_M)
        if pid_m * BLOCK_M >= Ls:
            return
        Ss = Ls
        row_sel = seq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < Ls

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    o_base = OUT + b * stride_ob + h * stride_oh
    if PACKED:
        q_base += first.to(tl.int64) * stride_ql
        k_base += first.to(tl.int64) * stride_ks
        v_base += first.to(tl.int64) * stride_vs
        o_base += first.to(tl.int64) * stride_ol
    q = _load_block(q_base, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + row_sel)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh
    row_offset = (pid_bh.to(tl.int64) * L + first + offs_m) * (P + S)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINKS:
        # The sink is a key of score `sink` and no value: it starts the online softmax, so it is in l and in
        # the LSE, and a row that sees no key ends with acc = 0 (zeros out) and lse = sink.
        m_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * (tl.load(SINK_LOGITS + h) * LOG2E)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < P
        k = _load_block(pk_base, cols, stride_pkp, offs_d, stride_pkd, col_valid, D)
        v = _load_block(pv_base, cols, stride_pvp, offs_d, stride_pvd, col_valid, D)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, col_valid[None, :], scale_log2, softcap, seed,
                                   row_offset, cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)

    seq_lo, seq_begin, seq_end = _seq_key_range(start_m, Ls, Ss, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(seq_begin, seq_end, BLOCK_N):
        cols = start_n + offs_n
        visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM)[None, :]
        visible = _in_view(visible, offs_m[:, None], cols[None, :], Ss - Ls, window, CAUSAL, WINDOW)
        kv_valid = cols < Ss
        if WINDOW:
            kv_valid = kv_valid & (cols >= seq_lo)
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, kv_valid, D)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, kv_valid, D)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap, seed, row_offset,
                                   P + first + cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    # +inf for rows with no visible key makes exp(s - lse) exactly 0 in the backward (zero gradients).
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_i)) * LN2)
    tl.store(LSE + pid_bh * L + first + offs_m, lse, mask=row_valid)
    o_ptrs = o_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
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
def _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, softcap, seed, row_offset, cols, dropout_p,
              SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    qk, th = _scores(q, k, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
    p = tl.where(visible, tl.math.exp2(qk - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, row_offset, cols, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@autotuned_kernel("bwd_dq")
@triton.jit
def prefix_attention_bwd_dq(
    Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_kpm_b, stride_kpm_s,
    Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hkv = h // GROUP
    first = 0  # as in the forward
    Ls = L
    Ss = S
    row_sel = b
    if PACKED:
        seq, pid_m, first, Ls = _packed_sequence(CU_SEQLENS, pid_m, n_seqs, BLOCK_M)
        if pid_m * BLOCK_M >= Ls:
            return
        Ss = Ls
        row_sel = seq
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < Ls

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    if PACKED:
        q_base += first.to(tl.int64) * stride_ql
        do_base += first.to(tl.int64) * stride_dol
        dq_base += first.to(tl.int64) * stride_dql
        k_base += first.to(tl.int64) * stride_ks
        v_base += first.to(tl.int64) * stride_vs
    q = _load_block(q_base, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
    do = _load_block(do_base, offs_m, stride_dol, offs_d, stride_dod, row_valid, D)
    lse2 = tl.load(LSE + pid_bh * L + first + offs_m, mask=row_valid, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + pid_bh * L + first + offs_m, mask=row_valid, other=0.0)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + row_sel)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh
    row_offset = (pid_bh.to(tl.int64) * L + first + offs_m) * (P + S)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for start_n in range(0, P, BLOCK_N):
        cols = start_n + offs_n
        col_valid = cols < P
        k = _load_block(pk_base, cols, stride_pkp, offs_d, stride_pkd, col_valid, D)
        v = _load_block(pv_base, cols, stride_pvp, offs_d, stride_pvd, col_valid, D)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, col_valid[None, :], scale_log2, softcap, seed, row_offset,
                       cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)

    seq_lo, seq_begin, seq_end = _seq_key_range(start_m, Ls, Ss, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(seq_begin, seq_end, BLOCK_N):
        cols = start_n + offs_n
        visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM)[None, :]
        visible = _in_view(visible, offs_m[:, None], cols[None, :], Ss - Ls, window, CAUSAL, WINDOW)
        kv_valid = cols < Ss
        if WINDOW:
            kv_valid = kv_valid & (cols >= seq_lo)
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, kv_valid, D)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, kv_valid, D)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, softcap, seed, row_offset,
                       P + first + cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)

    dq = dq * (scale_log2 * LN2)
    dq_ptrs = dq_base + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, softcap, seed, row_offset, cols,
                dropout_p, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dk and dv accumulate without transposing them back.
    qk_t, th_t = _scores(k, q, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
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
    if SOFTCAP:
        ds_t = ds_t * (1.0 - th_t * th_t)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@autotuned_kernel("bwd_dkdv")
@triton.jit
def prefix_attention_bwd_dkdv(
    Q, K, V, KPM, CU_SEQLENS, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_kpm_b, stride_kpm_s,
    Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of the sequence keys/values: one program owns one key block of one (row, KV head), or of one
    packed sequence (whose queries are the only ones that see it)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    first = 0  # as in the forward
    Ls = L
    Ss = S
    if PACKED:
        _, pid_n, first, Ls = _packed_sequence(CU_SEQLENS, pid_n, n_seqs, BLOCK_N)
        if pid_n * BLOCK_N >= Ls:
            return
        Ss = Ls
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    dk_base = DK + b * stride_dkb + hkv * stride_dkh
    dv_base = DV + b * stride_dvb + hkv * stride_dvh
    if PACKED:
        k_base += first.to(tl.int64) * stride_ks
        v_base += first.to(tl.int64) * stride_vs
        dk_base += first.to(tl.int64) * stride_dks
        dv_base += first.to(tl.int64) * stride_dvs
    col_valid = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM)
    kv_valid = cols < Ss
    if WINDOW:
        # Keys before S - L - window + 1 are in no query's window: never loaded, zero gradients.
        kv_valid = kv_valid & (cols > Ss - Ls - window)
        col_valid = col_valid & kv_valid
    k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, kv_valid, D)
    v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, kv_valid, D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)

    # Causal: queries before start_n - (S - L) see none of these keys, so their blocks are skipped; a key
    # block that is all padding (left-padded batches) skips every query block and stores zeros. A window
    # also ends the loop: queries from start_n + BLOCK_N - 1 + window - (S - L) on see past this block.
    first_m = 0
    end_m = Ls
    if CAUSAL:
        first_m = (tl.maximum(start_n - (Ss - Ls), 0) // BLOCK_M) * BLOCK_M
    if WINDOW:
        end_m = tl.minimum(Ls, start_n + BLOCK_N - 1 + window - (Ss - Ls))
    if HAS_KPM:
        first_m = tl.where(tl.max(col_valid.to(tl.int32), 0) > 0, first_m, Ls)
    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        if PACKED:
            q_base += first.to(tl.int64) * stride_ql
            do_base += first.to(tl.int64) * stride_dol
        for start_m in range(first_m, end_m, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_valid = offs_m < Ls
            q = _load_block(q_base, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
            do = _load_block(do_base, offs_m, stride_dol, offs_d, stride_dod, row_valid, D)
            lse2 = tl.load(LSE + bh * L + first + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + bh * L + first + offs_m, mask=row_valid, other=0.0)
            visible_t = col_valid[:, None] & row_valid[None, :]
            visible_t = _in_view(visible_t, offs_m[None, :], cols[:, None], Ss - Ls, window, CAUSAL, WINDOW)
            row_offset = (bh.to(tl.int64) * L + first + offs_m) * (P + S)
            dk, dv = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, softcap, seed,
                                 row_offset, P + first + cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)

    dk = dk * (scale_log2 * LN2)
    d_mask = (cols[:, None] < Ss) & (offs_d[None, :] < D)
    tl.store(dk_base + cols[:, None] * stride_dks + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=d_mask)
    tl.store(dv_base + cols[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=d_mask)


@autotuned_kernel("bwd_dprefix")
@triton.jit
def prefix_attention_bwd_dprefix(
    Q, PK, PV, PIDX, DO, LSE, DELTA, DPK, DPV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    B, Hq, Hkv, L, S, P, T, n_splits, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Prefix gradients, reduced over every (batch row, query head of the group, query block).

    Those units are split into `n_splits` contiguous chunks, one program per (prefix key block, prefix,
    KV head, chunk). Each chunk's fp32 sum goes to its own slice of DPK/DPV ([n_splits, T, Hkv, P, D]) and
    the host sums the slices in a fixed order: deterministic. With ATOMIC the chunks add into one fp32
    [T, Hkv, P, D] buffer instead: less memory traffic, but the summation order varies from run to run.

    Every query sees the whole prefix, so windows and sequence bounds change nothing here: a packed row is
    one row. With PACKED (packed sequences, a prefix each), PIDX holds the prefix of every query row, as a
    query block may span sequences that read different prefixes.
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
            if PACKED:
                rows = start_m + tl.arange(0, BLOCK_M)
                reads_t = tl.load(PIDX + rows, mask=rows < L, other=-1) == t
                uses_prefix = tl.max(reads_t.to(tl.int32), 0) > 0
            else:
                uses_prefix = tl.load(PIDX + b) == t
        if uses_prefix:
            h = hkv * GROUP + g
            bh = b * Hq + h
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_valid = offs_m < L
            if MULTI_PREFIX:
                if PACKED:
                    row_valid = row_valid & reads_t
            q = _load_block(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, offs_d, stride_qd, row_valid, D)
            do = _load_block(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, offs_d, stride_dod,
                             row_valid, D)
            lse2 = tl.load(LSE + bh * L + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_valid, other=0.0)
            row_offset = (bh.to(tl.int64) * L + offs_m) * (P + S)
            dk, dv = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, col_valid[:, None] & row_valid[None, :],
                                 scale_log2, softcap, seed, row_offset, cols, dropout_p, SOFTCAP, DROPOUT,
                                 DOT_PRECISION)

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
