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
def _load_block(base, offs_rows, stride_row, offs_d, stride_d, row_mask, D: tl.constexpr, D_PAD: tl.constexpr,
                MASKED: tl.constexpr):
    """A [rows, D_PAD] tile. Row offsets that may pass 2**31 (rows * stride of a long sequence) come as int64
    rows (a per-block vector in the loops: a 2-D offset tensor invariant in a loop would be hoisted out of it and
    held in registers across the kernel), or the block's first row is folded into `base` (blocks loaded once).
    MASKED: rows outside `row_mask` read 0; otherwise every row is inside the tensor and only the head-dim padding
    (if any) is masked."""
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if MASKED:
        if D == D_PAD:
            return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        return tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
    if D == D_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _load_kv(base, row, head, start, offs_n, stride_row, offs_d, stride_d, row_mask, D: tl.constexpr,
             D_PAD: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_N, D_PAD] key or value tile of rows start + offs_n. TMA: `base` is a [rows, heads, n, D] tensor
    descriptor whose (row, head) slice holds them; the copy engine zero-fills rows past n and columns past D, so
    no load mask is computed (the masks on the scores still apply). Otherwise `base` points at the slice's first
    row and `_load_block` applies MASKED and `row_mask`."""
    if TMA:
        tile = base.load([tl.cast(row, tl.int32), head, start, 0]).reshape(BLOCK_N, D_PAD)
    else:
        tile = _load_block(base, (start + offs_n).to(tl.int64), stride_row, offs_d, stride_d, row_mask, D, D_PAD,
                           MASKED)
    return tile


@triton.jit
def _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, S, HAS_KPM: tl.constexpr, FULL: tl.constexpr):
    """Columns that are real keys (inside S and not padding). FULL: the block lies inside S."""
    valid = cols < S
    if HAS_KPM:
        if FULL:
            valid = tl.load(KPM + b * stride_kpm_b + cols * stride_kpm_s) != 0
        else:
            real = tl.load(KPM + b * stride_kpm_b + cols * stride_kpm_s, mask=valid, other=0)
            valid = valid & (real != 0)
    return valid


@triton.jit
def _tanh(x):
    # Not every Triton has tl.tanh; this form saturates to +-1 for large |x| (exp2 -> inf or 0), never NaN.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _scores(q, k, scale_log2, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(x, th, mult): the log2-domain scores are `x * mult`, and th = tanh(s / softcap) (the backward's
    1 - tanh^2) under SOFTCAP.

    Without SOFTCAP x is the raw dot product and mult = scale * log2(e), so that callers fold the scale into
    the exponent's FMA (`exp2(x * mult - m)`) instead of a separate multiply. With SOFTCAP the cap applies to
    the natural-scale scores s = qk * scale, x is already in the log2 domain and mult = 1."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        th = _tanh(qk * (scale_log2 / (softcap * LOG2E)))
        return th * (softcap * LOG2E), th, 1.0
    return qk, qk, scale_log2


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap, seed, row_offset, cols, dropout_p,
               MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. MASKED: `visible` applies; otherwise every query sees every key of
    the block, so no select is spent on scores and the running max stays finite."""
    x, _, mult = _scores(q, k, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
    if MASKED:
        x = tl.where(visible, x, float("-inf"))
    # scale > 0, so max(x) * mult = max(x * mult): the max is taken on the raw scores, the scale folds into
    # the FMA of exp2's argument.
    m_new = tl.maximum(m_i, tl.max(x, 1) * mult)
    m_safe = m_new
    if MASKED:
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(x * mult - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, row_offset, cols, dropout_p), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _causal_seq_end(stop, L, S, CAUSAL: tl.constexpr):
    # One past the last sequence key the queries before `stop` may see (bottom-right aligned causal mask).
    if CAUSAL:
        return tl.minimum(S, tl.maximum(stop + S - L, 0))
    return S


@triton.jit
def _seq_key_range(first, stop, L, S, window, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(first key any of the queries [first, stop) sees, the key block it lies in, one past the last key).

    The queries of a block see a contiguous range of keys: the window's lower bound follows the block's first
    query, the causal bound its last one. Key blocks outside the range are never visited, and keys of the
    first block below the range are never loaded."""
    lo = 0
    if WINDOW:
        lo = tl.maximum(first + (S - L) - window + 1, 0)
    return lo, (lo // BLOCK_N) * BLOCK_N, _causal_seq_end(stop, L, S, CAUSAL)


@triton.jit
def _unmasked_key_blocks(first, stop, L, S, window, seq_begin, seq_end, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[u_lo, u_hi): the key blocks inside [seq_begin, seq_end) that every query of [first, stop) sees whole
    (no causal or window bound cuts them, and they lie inside S), as multiples of BLOCK_N. The blocks of
    [seq_begin, u_lo) (the window's lower band) and [u_hi, seq_end) (the causal diagonal and the tail) are the
    masked ones. Bounds are clamped at 0 before dividing (Triton's integer division truncates)."""
    full_lo = seq_begin * 0
    full_hi = S
    if CAUSAL:
        # The first query sees keys <= first + S - L.
        full_hi = tl.minimum(S, tl.maximum(first + (S - L) + 1, 0))
    if WINDOW:
        # The last one, stop - 1, sees keys > stop - 1 + S - L - window.
        full_lo = tl.maximum(stop + (S - L) - window, 0)
    u_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, seq_begin), seq_end)
    u_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N * BLOCK_N, seq_end), u_lo)
    return u_lo, u_hi


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


@triton.jit
def _fwd_prefix_loop(acc, m_i, l_i, q, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp, stride_pvd, P,
                     scale_log2, softcap, seed, row_offset, dropout_p, t, hkv, D: tl.constexpr, D_PAD: tl.constexpr,
                     SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The prefix keys: every query sees them all, so the full blocks run unmasked and only the last partial
    block masks its columns past P. (t, hkv): the prefix slice under TMA (`_load_kv`)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    p_full = (P // BLOCK_N) * BLOCK_N
    for start_n in range(0, p_full, BLOCK_N):
        k = _load_kv(pk_base, t, hkv, start_n, offs_n, stride_pkp, offs_d, stride_pkd, offs_n, D, D_PAD, False, TMA,
                     BLOCK_N)
        v = _load_kv(pv_base, t, hkv, start_n, offs_n, stride_pvp, offs_d, stride_pvd, offs_n, D, D_PAD, False, TMA,
                     BLOCK_N)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, offs_n, scale_log2, softcap, seed, row_offset,
                                   start_n + offs_n, dropout_p, False, SOFTCAP, DROPOUT, DOT_PRECISION)
    for start_n in tl.range(p_full, P, BLOCK_N, num_stages=1):  # at most once: not pipelined
        col_valid = offs_n < P - start_n
        k = _load_kv(pk_base, t, hkv, start_n, offs_n, stride_pkp, offs_d, stride_pkd, col_valid, D, D_PAD, True,
                     TMA, BLOCK_N)
        v = _load_kv(pv_base, t, hkv, start_n, offs_n, stride_pvp, offs_d, stride_pvd, col_valid, D, D_PAD, True,
                     TMA, BLOCK_N)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, col_valid[None, :], scale_log2, softcap, seed,
                                   row_offset, start_n + offs_n, dropout_p, True, SOFTCAP, DROPOUT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _masked_seq_block(k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, KPM, stride_kpm_b, stride_kpm_s, b,
                      hkv, start_n, offs_n, offs_d, seq_lo, offs_m, Ls, Ss, window, D: tl.constexpr,
                      D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                      TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    """(k, v, visible) of the sequence key block at start_n in a masked loop of the forward or dq: the key
    padding, causal and window rules decide what each query sees, and no key outside S and past seq_lo is loaded
    (under TMA the copy engine reads the block's keys below seq_lo too: real keys, hidden by `visible`)."""
    cols = start_n + offs_n
    visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM, False)[None, :]
    visible = _in_view(visible, offs_m[:, None], cols[None, :], Ss - Ls, window, CAUSAL, WINDOW)
    kv_valid = cols < Ss
    if WINDOW:
        kv_valid = kv_valid & (cols >= seq_lo)
    k = _load_kv(k_base, b, hkv, start_n, offs_n, stride_ks, offs_d, stride_kd, kv_valid, D, D_PAD, True, TMA,
                 BLOCK_N)
    v = _load_kv(v_base, b, hkv, start_n, offs_n, stride_vs, offs_d, stride_vd, kv_valid, D, D_PAD, True, TMA,
                 BLOCK_N)
    return k, v, visible


@triton.jit
def _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                  KPM, stride_kpm_b, stride_kpm_s, b, hkv, lo, hi, seq_lo, offs_m, Ls, Ss, window,
                  scale_log2, softcap, seed, row_offset, col_base, dropout_p, D: tl.constexpr, D_PAD: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                  SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Sequence key blocks [lo, hi). MASKED: the causal/window rules and the bounds S and seq_lo apply (and no
    key outside them is loaded); otherwise the blocks are whole inside the view of every query, and only the
    key padding (per column) applies. (b, hkv): the K/V slice under TMA (`_load_kv`)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    # The masked loop runs a few blocks (the diagonal, the tail, the window's band): it is not pipelined, which
    # keeps its prologue out of the registers and shared memory the unmasked loop's pipeline uses.
    if MASKED:
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1):
            cols = start_n + offs_n
            k, v, visible = _masked_seq_block(k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, KPM,
                                              stride_kpm_b, stride_kpm_s, b, hkv, start_n, offs_n, offs_d, seq_lo,
                                              offs_m, Ls, Ss, window, D, D_PAD, CAUSAL, WINDOW, HAS_KPM, TMA,
                                              BLOCK_N)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap, seed, row_offset,
                                       col_base + cols, dropout_p, True, SOFTCAP, DROPOUT, DOT_PRECISION)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM, True)[None, :]
            k = _load_kv(k_base, b, hkv, start_n, offs_n, stride_ks, offs_d, stride_kd, offs_n, D, D_PAD, False,
                         TMA, BLOCK_N)
            v = _load_kv(v_base, b, hkv, start_n, offs_n, stride_vs, offs_d, stride_vd, offs_n, D, D_PAD, False,
                         TMA, BLOCK_N)
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k, v, visible, scale_log2, softcap, seed, row_offset,
                                       col_base + cols, dropout_p, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION)
    return acc, m_i, l_i


@autotuned_kernel("fwd")
@triton.jit(do_not_specialize=["seed"])
def prefix_attention_fwd(
    Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, SINK_LOGITS, OUT, LSE,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_kpm_b, stride_kpm_s,
    Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET, P_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # TMA (sm_90, not PACKED): Q, K, V, PK, PV and OUT are [B or T, heads, rows, D] tensor descriptors whose
    # block shapes the launch sets from BLOCK_M / BLOCK_N (launch.py); their strides go unused.
    # Grid (B * Hq, query blocks): B * Hq on axis 0, which has no 65535 limit.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
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
    offs_r = tl.arange(0, BLOCK_M)  # rows within the block; offs_m counts from the (sequence's) first query
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < Ls

    # Base pointers in int64 (rows * stride may pass 2**31); offsets inside a block stay int32.
    row0 = tl.cast(first + start_m, tl.int64)
    if TMA:
        q = Q.load([tl.cast(b, tl.int32), h, start_m, 0]).reshape(BLOCK_M, D_PAD)
        k_base, v_base = K, V
    else:
        q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_ql
        o_base = OUT + b * stride_ob + h * stride_oh + row0 * stride_ol
        k_base = K + b * stride_kb + hkv * stride_kh + tl.cast(first, tl.int64) * stride_ks
        v_base = V + b * stride_vb + hkv * stride_vh + tl.cast(first, tl.int64) * stride_vs
        q = _load_block(q_base, offs_r, stride_ql, offs_d, stride_qd, row_valid, D, D_PAD, True)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + row_sel)
    if TMA:
        pk_base, pv_base = PK, PV
    else:
        pk_base = PK + t * stride_pkt + hkv * stride_pkh
        pv_base = PV + t * stride_pvt + hkv * stride_pvh
    lse_row = pid_bh.to(tl.int64) * L + first  # B * Hq * L may pass 2**31
    row_offset = (lse_row + offs_m) * (P + S)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINKS:
        # The sink is a key of score `sink` and no value: it starts the online softmax, so it is in l and in
        # the LSE, and a row that sees no key ends with acc = 0 (zeros out) and lse = sink.
        m_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * (tl.load(SINK_LOGITS + h) * LOG2E)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    acc, m_i, l_i = _fwd_prefix_loop(acc, m_i, l_i, q, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp,
                                     stride_pvd, P, scale_log2, softcap, seed, row_offset, dropout_p, t, hkv, D,
                                     D_PAD, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, TMA)

    # Sequence keys: the window's lower band (masked), the blocks every query sees whole (unmasked), then the
    # causal diagonal and the tail past the last full block (masked).
    seq_lo, seq_begin, seq_end = _seq_key_range(start_m, start_m + BLOCK_M, Ls, Ss, window, BLOCK_N, CAUSAL,
                                                 WINDOW)
    u_lo, u_hi = _unmasked_key_blocks(start_m, start_m + BLOCK_M, Ls, Ss, window, seq_begin, seq_end, BLOCK_N,
                                      CAUSAL, WINDOW)
    if WINDOW:
        acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs,
                                      stride_vd, KPM, stride_kpm_b, stride_kpm_s, b, hkv, seq_begin, u_lo, seq_lo,
                                      offs_m, Ls, Ss, window, scale_log2, softcap, seed, row_offset, P + first,
                                      dropout_p, D, D_PAD, True, CAUSAL, WINDOW, HAS_KPM, SOFTCAP, DROPOUT,
                                      DOT_PRECISION, BLOCK_N, TMA)
    acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  KPM, stride_kpm_b, stride_kpm_s, b, hkv, u_lo, u_hi, seq_lo, offs_m, Ls, Ss, window,
                                  scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, False,
                                  CAUSAL, WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N, TMA)
    acc, m_i, l_i = _fwd_seq_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                  KPM, stride_kpm_b, stride_kpm_s, b, hkv, u_hi, seq_end, seq_lo, offs_m, Ls, Ss,
                                  window, scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, True,
                                  CAUSAL, WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N, TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    # +inf for rows with no visible key makes exp(s - lse) exactly 0 in the backward (zero gradients).
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_i)) * LN2)
    tl.store(LSE + lse_row + offs_m, lse, mask=row_valid)
    if TMA:
        # The copy engine drops the rows past L and the columns past D.
        OUT.store([tl.cast(b, tl.int32), h, start_m, 0], out.to(OUT.dtype).reshape(1, 1, BLOCK_M, D_PAD))
    else:
        o_ptrs = o_base + offs_r[:, None] * stride_ol + offs_d[None, :] * stride_od
        if D == D_PAD:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None])
        else:
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def prefix_attention_bwd_preprocess(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    Hq, L,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_r
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < L
    row0 = tl.cast(pid_m * BLOCK_M, tl.int64)
    o = _load_block(OUT + b * stride_ob + h * stride_oh + row0 * stride_ol, offs_r, stride_ol, offs_d, stride_od,
                    row_valid, D, D_PAD, True)
    do = _load_block(DO + b * stride_dob + h * stride_doh + row0 * stride_dol, offs_r, stride_dol, offs_d,
                     stride_dod, row_valid, D, D_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_m, delta, mask=row_valid)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, softcap, seed, row_offset, cols, dropout_p,
              MASKED: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    x, th, mult = _scores(q, k, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
    p = tl.math.exp2(x * mult - lse2[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, row_offset, cols, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - th * th)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dq_prefix_loop(dq, q, do, lse2, delta, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp, stride_pvd, P,
                    scale_log2, softcap, seed, row_offset, dropout_p, D: tl.constexpr, D_PAD: tl.constexpr,
                    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """As `_fwd_prefix_loop`: full prefix blocks unmasked, the last partial one masked."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    p_full = (P // BLOCK_N) * BLOCK_N
    for start_n in range(0, p_full, BLOCK_N):
        k = _load_block(pk_base, (start_n + offs_n).to(tl.int64), stride_pkp, offs_d, stride_pkd,
                        offs_n, D, D_PAD, False)
        v = _load_block(pv_base, (start_n + offs_n).to(tl.int64), stride_pvp, offs_d, stride_pvd,
                        offs_n, D, D_PAD, False)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, offs_n, scale_log2, softcap, seed, row_offset,
                       start_n + offs_n, dropout_p, False, SOFTCAP, DROPOUT, DOT_PRECISION)
    for start_n in tl.range(p_full, P, BLOCK_N, num_stages=1):  # at most once: not pipelined
        col_valid = offs_n < P - start_n
        k = _load_block(pk_base, (start_n + offs_n).to(tl.int64), stride_pkp, offs_d, stride_pkd,
                        col_valid, D, D_PAD, True)
        v = _load_block(pv_base, (start_n + offs_n).to(tl.int64), stride_pvp, offs_d, stride_pvd,
                        col_valid, D, D_PAD, True)
        dq = _dq_block(dq, q, do, lse2, delta, k, v, col_valid[None, :], scale_log2, softcap, seed, row_offset,
                       start_n + offs_n, dropout_p, True, SOFTCAP, DROPOUT, DOT_PRECISION)
    return dq


@triton.jit
def _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                 KPM, stride_kpm_b, stride_kpm_s, b, lo, hi, seq_lo, offs_m, Ls, Ss, window,
                 scale_log2, softcap, seed, row_offset, col_base, dropout_p, D: tl.constexpr, D_PAD: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                 SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """As `_fwd_seq_loop`, for dq."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if MASKED:
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1):
            cols = start_n + offs_n
            # dq reads through pointers (TMA is the forward's), so the KV head argument goes unused: 0.
            k, v, visible = _masked_seq_block(k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, KPM,
                                              stride_kpm_b, stride_kpm_s, b, 0, start_n, offs_n, offs_d, seq_lo,
                                              offs_m, Ls, Ss, window, D, D_PAD, CAUSAL, WINDOW, HAS_KPM, False,
                                              BLOCK_N)
            dq = _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, softcap, seed, row_offset,
                           col_base + cols, dropout_p, True, SOFTCAP, DROPOUT, DOT_PRECISION)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            visible = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM, True)[None, :]
            k = _load_block(k_base, cols.to(tl.int64), stride_ks, offs_d, stride_kd, offs_n, D, D_PAD, False)
            v = _load_block(v_base, cols.to(tl.int64), stride_vs, offs_d, stride_vd, offs_n, D, D_PAD, False)
            dq = _dq_block(dq, q, do, lse2, delta, k, v, visible, scale_log2, softcap, seed, row_offset,
                           col_base + cols, dropout_p, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION)
    return dq


@autotuned_kernel("bwd_dq")
@triton.jit(do_not_specialize=["seed"])
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
    Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET, P_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # grid (B * Hq, query blocks), as the forward
    pid_m = tl.program_id(1)
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
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, D_PAD)
    row_valid = offs_m < Ls

    row0 = tl.cast(first + start_m, tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_ql
    do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dol
    dq_base = DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dql
    k_base = K + b * stride_kb + hkv * stride_kh + tl.cast(first, tl.int64) * stride_ks
    v_base = V + b * stride_vb + hkv * stride_vh + tl.cast(first, tl.int64) * stride_vs
    q = _load_block(q_base, offs_r, stride_ql, offs_d, stride_qd, row_valid, D, D_PAD, True)
    do = _load_block(do_base, offs_r, stride_dol, offs_d, stride_dod, row_valid, D, D_PAD, True)
    lse_row = pid_bh.to(tl.int64) * L + first
    lse2 = tl.load(LSE + lse_row + offs_m, mask=row_valid, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + lse_row + offs_m, mask=row_valid, other=0.0)
    t = 0
    if MULTI_PREFIX:
        t = tl.load(PIDX + row_sel)
    pk_base = PK + t * stride_pkt + hkv * stride_pkh
    pv_base = PV + t * stride_pvt + hkv * stride_pvh
    row_offset = (lse_row + offs_m) * (P + S)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    dq = _dq_prefix_loop(dq, q, do, lse2, delta, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                         P, scale_log2, softcap, seed, row_offset, dropout_p, D, D_PAD, SOFTCAP, DROPOUT,
                         DOT_PRECISION, BLOCK_N)

    # As the forward: window band (masked), whole blocks (unmasked), diagonal and tail (masked).
    seq_lo, seq_begin, seq_end = _seq_key_range(start_m, start_m + BLOCK_M, Ls, Ss, window, BLOCK_N, CAUSAL,
                                                 WINDOW)
    u_lo, u_hi = _unmasked_key_blocks(start_m, start_m + BLOCK_M, Ls, Ss, window, seq_begin, seq_end, BLOCK_N,
                                      CAUSAL, WINDOW)
    if WINDOW:
        dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                          KPM, stride_kpm_b, stride_kpm_s, b, seq_begin, u_lo, seq_lo, offs_m, Ls, Ss, window,
                          scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, True, CAUSAL,
                          WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)
    dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                      KPM, stride_kpm_b, stride_kpm_s, b, u_lo, u_hi, seq_lo, offs_m, Ls, Ss, window,
                      scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, False, CAUSAL,
                      WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)
    dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                      KPM, stride_kpm_b, stride_kpm_s, b, u_hi, seq_end, seq_lo, offs_m, Ls, Ss, window,
                      scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, True, CAUSAL,
                      WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)

    dq = dq * (scale_log2 * LN2)
    dq_ptrs = dq_base + offs_r[:, None] * stride_dql + offs_d[None, :] * stride_dqd
    if D == D_PAD:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, softcap, seed, row_offset, cols,
                dropout_p, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dk and dv accumulate without transposing them back.
    x_t, th_t, mult = _scores(k, q, scale_log2, softcap, SOFTCAP, DOT_PRECISION)
    p_t = tl.where(visible_t, tl.math.exp2(x_t * mult - lse2[None, :]), 0.0)
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
    ds_t = ds_t.to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    return dk, dv, ds_t


@triton.jit
def _add_dq(DQ, ds_t, k, rows, offs_m, row_valid, offs_d, scale_log2, D: tl.constexpr, D_PAD: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """FlashAttention-2's fifth tile product: this key block's share of dq (ds @ k, scaled) added with fp32
    atomics into DQ, a contiguous fp32 [B, Hq, L, D] buffer whose row `rows + offs_m` is (row, head, query)."""
    dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * (scale_log2 * LN2)
    offs = (rows + offs_m)[:, None] * D + offs_d[None, :]
    tl.atomic_add(DQ + offs, dq, mask=row_valid[:, None] & (offs_d[None, :] < D), sem="relaxed")


@autotuned_kernel("bwd_dkdv")
@triton.jit(do_not_specialize=["seed"])
def prefix_attention_bwd_dkdv(
    Q, K, V, KPM, CU_SEQLENS, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_kpm_b, stride_kpm_s,
    Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET, P_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of the sequence keys/values: one program owns one key block of one (row, KV head), or of one
    packed sequence (whose queries are the only ones that see it).

    ATOMIC_DQ (the `atomic` backward, FlashAttention-2's): each (key block, query block) tile also adds its share
    of dq into DQ (fp32 [B, Hq, L, D], zeroed), so no `bwd_dq` launch recomputes the scores: 5 tile products per
    tile instead of 4 + 3."""
    pid_bh = tl.program_id(0)  # grid (B * Hkv, key blocks)
    pid_n = tl.program_id(1)
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
    offs_c = tl.arange(0, BLOCK_N)  # keys within the block
    cols = start_n + offs_c
    offs_d = tl.arange(0, D_PAD)
    col0 = tl.cast(first + start_n, tl.int64)
    k_base = K + b * stride_kb + hkv * stride_kh + col0 * stride_ks
    v_base = V + b * stride_vb + hkv * stride_vh + col0 * stride_vs
    dk_base = DK + b * stride_dkb + hkv * stride_dkh + col0 * stride_dks
    dv_base = DV + b * stride_dvb + hkv * stride_dvh + col0 * stride_dvs
    col_valid = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM, False)
    kv_valid = cols < Ss
    if WINDOW:
        # Keys before S - L - window + 1 are in no query's window: never loaded, zero gradients.
        kv_valid = kv_valid & (cols > Ss - Ls - window)
        col_valid = col_valid & kv_valid
    k = _load_block(k_base, offs_c, stride_ks, offs_d, stride_kd, kv_valid, D, D_PAD, True)
    v = _load_block(v_base, offs_c, stride_vs, offs_d, stride_vd, kv_valid, D, D_PAD, True)
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
        lse_row = bh * L + first  # int64 (b is)
        offs_r = tl.arange(0, BLOCK_M)
        for start_m in range(first_m, end_m, BLOCK_M):
            offs_m = start_m + offs_r
            row_valid = offs_m < Ls
            rows = (first + offs_m).to(tl.int64)
            q = _load_block(q_base, rows, stride_ql, offs_d, stride_qd, row_valid, D, D_PAD, True)
            do = _load_block(do_base, rows, stride_dol, offs_d, stride_dod, row_valid, D, D_PAD, True)
            lse2 = tl.load(LSE + lse_row + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + lse_row + offs_m, mask=row_valid, other=0.0)
            visible_t = col_valid[:, None] & row_valid[None, :]
            visible_t = _in_view(visible_t, offs_m[None, :], cols[:, None], Ss - Ls, window, CAUSAL, WINDOW)
            row_offset = (lse_row + offs_m) * (P + S)
            dk, dv, ds_t = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, softcap, seed,
                                       row_offset, P + first + cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)
            if ATOMIC_DQ:
                _add_dq(DQ, ds_t, k, lse_row, offs_m, row_valid, offs_d, scale_log2, D, D_PAD, DOT_PRECISION)

    dk = dk * (scale_log2 * LN2)
    d_mask = (cols[:, None] < Ss) & (offs_d[None, :] < D)
    tl.store(dk_base + offs_c[:, None] * stride_dks + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=d_mask)
    tl.store(dv_base + offs_c[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=d_mask)


@autotuned_kernel("bwd_dprefix")
@triton.jit(do_not_specialize=["seed"])
def prefix_attention_bwd_dprefix(
    Q, PK, PV, PIDX, DO, LSE, DELTA, DPK, DPV, DQ,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    B, Hq, Hkv, L, S, P, T, n_splits, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET, P_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    SOFTCAP: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Prefix gradients, reduced over every (batch row, query head of the group, query block).

    Those units are split into `n_splits` contiguous chunks, one program per (prefix key block, prefix,
    KV head, chunk). Each chunk's fp32 sum goes to its own slice of DPK/DPV ([n_splits, T, Hkv, P, D]) and
    the host sums the slices in a fixed order: deterministic. With ATOMIC the chunks add into one fp32
    [T, Hkv, P, D] buffer instead: less memory traffic, but the summation order varies from run to run.

    ATOMIC_DQ (the `atomic` backward): each tile also adds the prefix keys' share of dq into DQ, as
    `bwd_dkdv` does for the sequence keys.

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
    offs_c = tl.arange(0, BLOCK_N)
    col0 = tl.cast(start_n, tl.int64)
    k = _load_block(PK + t * stride_pkt + hkv * stride_pkh + col0 * stride_pkp, offs_c, stride_pkp, offs_d,
                    stride_pkd, col_valid, D, D_PAD, True)
    v = _load_block(PV + t * stride_pvt + hkv * stride_pvh + col0 * stride_pvp, offs_c, stride_pvp, offs_d,
                    stride_pvd, col_valid, D, D_PAD, True)
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
            offs_r = tl.arange(0, BLOCK_M)
            offs_m = start_m + offs_r
            row_valid = offs_m < L
            if MULTI_PREFIX:
                if PACKED:
                    row_valid = row_valid & reads_t
            q_rows = offs_m.to(tl.int64)
            q = _load_block(Q + b * stride_qb + h * stride_qh, q_rows, stride_ql, offs_d, stride_qd, row_valid, D,
                            D_PAD, True)
            do = _load_block(DO + b * stride_dob + h * stride_doh, q_rows, stride_dol, offs_d, stride_dod, row_valid,
                             D, D_PAD, True)
            lse2 = tl.load(LSE + bh * L + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + bh * L + offs_m, mask=row_valid, other=0.0)
            row_offset = (bh.to(tl.int64) * L + offs_m) * (P + S)
            dk, dv, ds_t = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, col_valid[:, None] & row_valid[None, :],
                                       scale_log2, softcap, seed, row_offset, cols, dropout_p, SOFTCAP, DROPOUT,
                                       DOT_PRECISION)
            if ATOMIC_DQ:
                _add_dq(DQ, ds_t, k, bh * L, offs_m, row_valid, offs_d, scale_log2, D, D_PAD, DOT_PRECISION)

    dk = dk * (scale_log2 * LN2)
    # DPK/DPV are contiguous fp32 buffers [n_splits or 1, T, Hkv, P, D].
    slot = tl.cast(t * Hkv + hkv, tl.int64) * P  # int64: the buffers may pass 2**31 elements
    if not ATOMIC:
        slot += tl.cast(split, tl.int64) * (T * Hkv * P)
    offs = (slot + cols[:, None]) * D + offs_d[None, :]
    d_mask = col_valid[:, None] & (offs_d[None, :] < D)
    if ATOMIC:
        tl.atomic_add(DPK + offs, dk, mask=d_mask)
        tl.atomic_add(DPV + offs, dv, mask=d_mask)
    else:
        tl.store(DPK + offs, dk, mask=d_mask)
        tl.store(DPV + offs, dv, mask=d_mask)


@triton.jit(do_not_specialize=["seed"])
def prefix_attention_dropout_mask(KEEP, L, P, S, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask [B, Hq, L, P + S] the attention kernels draw for `seed` (for tests)."""
    pid_bh = tl.program_id(0)  # grid (B * Hq, query blocks, key blocks)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_offset = (pid_bh.to(tl.int64) * L + offs_m) * (P + S)
    keep = _dropout_keep(seed, row_offset, cols, dropout_p)
    ptrs = KEEP + row_offset[:, None] + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (cols[None, :] < P + S))
