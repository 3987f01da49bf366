"""The opt-in one-launch backward (PREFIX_KERNELS_TRITON_BWD=fused, launch.py): dq, dK and dV of the sequence
keys from one program per (row, KV head, block), in place of `bwd_dq` + `bwd_dkdv` (kernels.py). The prefix
gradients stay in `bwd_dprefix`. Not the default: unmeasured on a GPU, its tiles are smaller (both parts' state
in one program) and a GQA group's dq runs serially in one program (docs/kernels.md, "The fused backward").
"""

import triton
import triton.language as tl

from .configs import autotuned_kernel
from .kernels import (LN2, LOG2E, _dkdv_block, _dq_prefix_loop, _dq_seq_loop, _in_view, _key_padding, _load_block,
                      _packed_sequence, _seq_key_range, _unmasked_key_blocks)


@triton.jit
def _fused_dkdv(Q, K, V, KPM, CU_SEQLENS, DO, LSE, DELTA, DK, DV, pid, b, hkv,
                stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dol, stride_dod,
                stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                stride_kpm_b, stride_kpm_s, Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed,
                GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bwd_dkdv's body for key block `pid` (skipped past the row's or packed sequence's keys)."""
    first = 0
    Ls = L
    Ss = S
    pid_n = pid
    if PACKED:
        _, pid_n, first, Ls = _packed_sequence(CU_SEQLENS, pid, n_seqs, BLOCK_N)
        Ss = Ls
    start_n = pid_n * BLOCK_N
    if start_n < Ss:
        offs_c = tl.arange(0, BLOCK_N)
        cols = start_n + offs_c
        offs_d = tl.arange(0, D_PAD)
        col0 = tl.cast(first + start_n, tl.int64)
        k_base = K + b * stride_kb + hkv * stride_kh + col0 * stride_ks
        v_base = V + b * stride_vb + hkv * stride_vh + col0 * stride_vs
        col_valid = _key_padding(KPM, stride_kpm_b, stride_kpm_s, b, cols, Ss, HAS_KPM, False)
        kv_valid = cols < Ss
        if WINDOW:
            kv_valid = kv_valid & (cols > Ss - Ls - window)
            col_valid = col_valid & kv_valid
        k = _load_block(k_base, offs_c, stride_ks, offs_d, stride_kd, kv_valid, D, D_PAD, True)
        v = _load_block(v_base, offs_c, stride_vs, offs_d, stride_vd, kv_valid, D, D_PAD, True)
        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        # The query blocks that see these keys, as bwd_dkdv bounds them.
        first_m = 0
        end_m = Ls
        if CAUSAL:
            first_m = (tl.maximum(start_n - (Ss - Ls), 0) // BLOCK_M) * BLOCK_M
        if WINDOW:
            end_m = tl.minimum(Ls, start_n + BLOCK_N - 1 + window - (Ss - Ls))
        if HAS_KPM:
            first_m = tl.where(tl.max(col_valid.to(tl.int32), 0) > 0, first_m, Ls)
        offs_r = tl.arange(0, BLOCK_M)
        for g in range(GROUP):
            h = hkv * GROUP + g
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            lse_row = (b * Hq + h) * L + first  # int64 (b is)
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
                dk, dv, _ds_t = _dkdv_block(dk, dv, k, v, q, do, lse2, delta, visible_t, scale_log2, softcap, seed,
                                            row_offset, P + first + cols, dropout_p, SOFTCAP, DROPOUT, DOT_PRECISION)
        dk = dk * (scale_log2 * LN2)
        d_mask = (cols[:, None] < Ss) & (offs_d[None, :] < D)
        dk_base = DK + b * stride_dkb + hkv * stride_dkh + col0 * stride_dks
        dv_base = DV + b * stride_dvb + hkv * stride_dvh + col0 * stride_dvs
        tl.store(dk_base + offs_c[:, None] * stride_dks + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                 mask=d_mask)
        tl.store(dv_base + offs_c[:, None] * stride_dvs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                 mask=d_mask)


@triton.jit
def _fused_dq(Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, DO, LSE, DELTA, DQ, pid, b, hkv,
              stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
              stride_vb, stride_vh, stride_vs, stride_vd, stride_pkt, stride_pkh, stride_pkp, stride_pkd,
              stride_pvt, stride_pvh, stride_pvp, stride_pvd, stride_dob, stride_doh, stride_dol, stride_dod,
              stride_dqb, stride_dqh, stride_dql, stride_dqd, stride_kpm_b, stride_kpm_s,
              Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed,
              GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
              SOFTCAP: tl.constexpr, PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """bwd_dq's body for query block `pid` of every query head of the group, one head after the other."""
    first = 0
    Ls = L
    Ss = S
    pid_m = pid
    row_sel = b
    if PACKED:
        seq, pid_m, first, Ls = _packed_sequence(CU_SEQLENS, pid, n_seqs, BLOCK_M)
        Ss = Ls
        row_sel = seq
    start_m = pid_m * BLOCK_M
    if start_m < Ls:
        offs_r = tl.arange(0, BLOCK_M)
        offs_m = start_m + offs_r
        offs_d = tl.arange(0, D_PAD)
        row_valid = offs_m < Ls
        row0 = tl.cast(first + start_m, tl.int64)
        k_base = K + b * stride_kb + hkv * stride_kh + tl.cast(first, tl.int64) * stride_ks
        v_base = V + b * stride_vb + hkv * stride_vh + tl.cast(first, tl.int64) * stride_vs
        t = 0
        if MULTI_PREFIX:
            t = tl.load(PIDX + row_sel)
        pk_base = PK + t * stride_pkt + hkv * stride_pkh
        pv_base = PV + t * stride_pvt + hkv * stride_pvh
        seq_lo, seq_begin, seq_end = _seq_key_range(start_m, start_m + BLOCK_M, Ls, Ss, window, BLOCK_N, CAUSAL,
                                                     WINDOW)
        u_lo, u_hi = _unmasked_key_blocks(start_m, start_m + BLOCK_M, Ls, Ss, window, seq_begin, seq_end, BLOCK_N,
                                          CAUSAL, WINDOW)
        for g in range(GROUP):
            h = hkv * GROUP + g
            q = _load_block(Q + b * stride_qb + h * stride_qh + row0 * stride_ql, offs_r, stride_ql, offs_d,
                            stride_qd, row_valid, D, D_PAD, True)
            do = _load_block(DO + b * stride_dob + h * stride_doh + row0 * stride_dol, offs_r, stride_dol, offs_d,
                             stride_dod, row_valid, D, D_PAD, True)
            lse_row = (b * Hq + h) * L + first  # int64 (b is)
            lse2 = tl.load(LSE + lse_row + offs_m, mask=row_valid, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + lse_row + offs_m, mask=row_valid, other=0.0)
            row_offset = (lse_row + offs_m) * (P + S)
            dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
            dq = _dq_prefix_loop(dq, q, do, lse2, delta, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp,
                                 stride_pvd, P, scale_log2, softcap, seed, row_offset, dropout_p, D, D_PAD, SOFTCAP,
                                 DROPOUT, DOT_PRECISION, BLOCK_N)
            if WINDOW:
                dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs,
                                  stride_vd, KPM, stride_kpm_b, stride_kpm_s, b, seq_begin, u_lo, seq_lo, offs_m, Ls,
                                  Ss, window, scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD,
                                  True, CAUSAL, WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)
            dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                              KPM, stride_kpm_b, stride_kpm_s, b, u_lo, u_hi, seq_lo, offs_m, Ls, Ss, window,
                              scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, False, CAUSAL,
                              WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)
            dq = _dq_seq_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                              KPM, stride_kpm_b, stride_kpm_s, b, u_hi, seq_end, seq_lo, offs_m, Ls, Ss, window,
                              scale_log2, softcap, seed, row_offset, P + first, dropout_p, D, D_PAD, True, CAUSAL,
                              WINDOW, HAS_KPM, SOFTCAP, DROPOUT, DOT_PRECISION, BLOCK_N)
            dq = dq * (scale_log2 * LN2)
            dq_ptrs = (DQ + b * stride_dqb + h * stride_dqh + row0 * stride_dql + offs_r[:, None] * stride_dql
                       + offs_d[None, :] * stride_dqd)
            if D == D_PAD:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])
            else:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < D))


@autotuned_kernel("bwd_fused")
@triton.jit(do_not_specialize=["seed"])
def prefix_attention_bwd_fused(
    Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkt, stride_pkh, stride_pkp, stride_pkd,
    stride_pvt, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_kpm_b, stride_kpm_s,
    Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, L_BUCKET, S_BUCKET, P_BUCKET,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MULTI_PREFIX: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PACKED: tl.constexpr, DQ_ON: tl.constexpr, DKDV_ON: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program `pid` of a (row, KV head): dK, dV of sequence key block `pid` (BLOCK_N keys), then the dq of query
    block `pid` (BLOCK_M queries) of each query head of the group. The grid covers max(query blocks, key blocks);
    each part skips the programs past its own blocks, and maps `pid` to its packed sequence with its own block.
    Every gradient has one writer: no atomics, bitwise repeatable. The key part stores before the query part
    starts, so their registers do not add up. DQ_ON / DKDV_ON: the parts autograd wants (the other is not
    compiled)."""
    pid_bh = tl.program_id(0)  # B * Hkv on axis 0, the only one past 65535
    pid = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = pid_bh % Hkv
    if DKDV_ON:
        _fused_dkdv(Q, K, V, KPM, CU_SEQLENS, DO, LSE, DELTA, DK, DV, pid, b, hkv,
                    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                    stride_vb, stride_vh, stride_vs, stride_vd, stride_dob, stride_doh, stride_dol, stride_dod,
                    stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                    stride_kpm_b, stride_kpm_s, Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed,
                    GROUP, D, D_PAD, CAUSAL, HAS_KPM, DROPOUT, WINDOW, SOFTCAP, PACKED, DOT_PRECISION, BLOCK_M,
                    BLOCK_N)
    if DQ_ON:
        _fused_dq(Q, K, V, PK, PV, KPM, PIDX, CU_SEQLENS, DO, LSE, DELTA, DQ, pid, b, hkv,
                  stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                  stride_vb, stride_vh, stride_vs, stride_vd, stride_pkt, stride_pkh, stride_pkp, stride_pkd,
                  stride_pvt, stride_pvh, stride_pvp, stride_pvd, stride_dob, stride_doh, stride_dol, stride_dod,
                  stride_dqb, stride_dqh, stride_dql, stride_dqd, stride_kpm_b, stride_kpm_s,
                  Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed,
                  GROUP, D, D_PAD, CAUSAL, HAS_KPM, MULTI_PREFIX, DROPOUT, WINDOW, SOFTCAP, PACKED, DOT_PRECISION,
                  BLOCK_M, BLOCK_N)
