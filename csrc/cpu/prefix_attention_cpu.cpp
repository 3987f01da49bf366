// CPU kernels of prefix_kernels::cpp_fwd / cpp_bwd / cpp_dropout_mask (DESIGN.md "The op").
//
// Flash-style: each task owns a block of at most kBlockQ queries of one (row, head), or in a decode-like
// forward every query of a GQA group, and walks the key blocks (prefix first, then the
// sequence) with an online softmax, so no [L, P + S] score matrix exists. Tiles are converted to fp32 once
// per block (fp32 inputs with contiguous rows are used in place); the matrix products and the softmax of a
// tile run in block_math.cpp (AVX2/FMA or baseline loops, chosen at load time). Backward recomputes the
// probabilities from the saved lse:
//   fused   per (chunk of batch rows, kv head): every key block, prefix then sequence, against every visible
//           query block of the group's heads; each tile computed once gives dq (accumulated per row in fp32),
//           the sequence dk/dv, and the chunk's fp32 prefix partial sums [T, Hkv, P, D]
//   or, when that leaves fewer tasks than threads (small B * Hkv), three passes with more tasks:
//   pass 1  dq        per (b, h, query block)
//   pass 2  dk, dv    per (b, kv head, sequence key block), looping over the group's heads and visible queries
//   pass 3  dprefix   per (chunk, kv head, prefix key block)
// Both add the same terms in the same order (bitwise the same results, so the thread count may choose). The
// batch rows are split into a fixed number of chunks (a function of B only), each chunk sums the prefix
// gradients into its own buffer, and the chunks are added in order: the same bits for any thread count, and
// no tensor of B * P K/V elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "block_math.h"

namespace prefix_kernels {
namespace cpu {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
constexpr int64_t kStackRows = 8;     // = gemm_rm's largest dot-product path (block_math.cpp)
constexpr int64_t kPrefixChunks = 8;  // fixed: the prefix-gradient reduction order never depends on threads
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A strided 4-d tensor view: element (i0, i1, i2, i3) at p[i0*s0 + i1*s1 + i2*s2 + i3*s3].
template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  View4(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* at(int64_t i0, int64_t i1, int64_t i2) const { return p + i0 * s0 + i1 * s1 + i2 * s2; }
};

// `n` rows of D values (row stride s_row, column stride s_col) as fp32 rows; returns the rows and sets ld.
// fp32 rows with contiguous columns are returned in place, everything else is converted into `buf`.
template <typename T>
inline const float* load_rows(const T* p, int64_t s_row, int64_t s_col, int64_t n, int64_t D, float* buf,
                              int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (s_col == 1 && (s_row >= D || n == 1)) {
      ld = n == 1 ? D : s_row;
      return p;
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* src = p + r * s_row;
    float* dst = buf + r * D;
    if (s_col == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * s_col]);
    }
  }
  ld = D;
  return buf;
}

// Rows j0 .. j0 + n - 1 of head slice (i0, i1) of a [., ., rows, D] view as fp32 rows (load_rows).
template <typename T>
inline const float* block_rows(const View4<T>& x, int64_t i0, int64_t i1, int64_t j0, int64_t n, int64_t D, float* buf,
                               int64_t& ld) {
  return load_rows(x.at(i0, i1, j0), x.s2, x.s3, n, D, buf, ld);
}

// Hide sequence keys [j0, j0 + n) of query rows [i0, i0 + m): padding and causal (j <= i + shift).
inline void mask_seq_tile(float* s, int64_t m, int64_t n, int64_t i0, int64_t j0, bool causal, int64_t shift,
                          const bool* kpm) {
  if (kpm != nullptr) {
    for (int64_t c = 0; c < n; ++c) {
      if (!kpm[j0 + c]) {
        for (int64_t r = 0; r < m; ++r) s[r * n + c] = kNegInf;
      }
    }
  }
  if (causal && j0 + n - 1 > i0 + shift) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t first_hidden = std::max<int64_t>(i0 + r + shift - j0 + 1, 0);
      for (int64_t c = first_hidden; c < n; ++c) s[r * n + c] = kNegInf;
    }
  }
}

inline bool all_padded(const bool* kpm, int64_t j0, int64_t n) {
  if (kpm == nullptr) return false;
  for (int64_t c = 0; c < n; ++c)
    if (kpm[j0 + c]) return false;
  return true;
}

// z[r, c] = keep / (1 - p) for the tile's rows (global query i0 + r) and key columns col0 + c.
inline void dropout_tile(float* z, int64_t m, int64_t n, uint64_t seed, uint64_t row_offset, uint64_t PS,
                         uint64_t col0, float dropout_p, float inv_keep) {
  for (int64_t r = 0; r < m; ++r)
    dropout_row(z + r * n, n, seed, row_offset + static_cast<uint64_t>(r) * PS + col0, dropout_p, inv_keep);
}

struct Problem {
  int64_t B, Hq, Hkv, group, L, S, P, D, T;
  bool causal;
  float scale;
  float dropout_p;
  uint64_t seed;
  const bool* kpm;          // [B, S] or null
  const int64_t* pindex;    // [B] or null
  int64_t nqb;              // query blocks per (b, h)
  // Decode-like forwards stack the GQA group's queries (every query of the group's heads) in one tile, so each
  // K/V tile is read once per KV head instead of once per query head, when that leaves a task per thread.
  // At most kStackRows rows: like a single head's rows they take gemm_rm's dot-product path, so each row's
  // result is bitwise the same stacked or not, and the thread count may decide.
  bool stack_group() const {
    return group > 1 && group * L <= kStackRows && B * Hkv >= at::get_num_threads();
  }
  int64_t shift() const { return S - L; }
  int64_t prefix_of(int64_t b) const { return pindex ? pindex[b] : 0; }
  const bool* kpm_row(int64_t b) const { return kpm ? kpm + b * S : nullptr; }
  // Number of sequence keys any query of [i0, i0 + m) may see.
  int64_t seq_end(int64_t i0, int64_t m) const {
    if (!causal) return S;
    return std::min<int64_t>(std::max<int64_t>(i0 + m + shift(), 0), S);
  }
  // The key blocks of a walk over query rows [i0, i0 + m) of row b: the prefix blocks, then the sequence
  // blocks up to seq_end (seq_end(i0, m)). key_block gives block blk's kind, first key and size, and false
  // for an all-padded sequence block (skipped).
  int64_t key_blocks(int64_t seq_end) const {
    return (P + kBlockK - 1) / kBlockK + (seq_end + kBlockK - 1) / kBlockK;
  }
  bool key_block(int64_t b, int64_t seq_end, int64_t blk, bool& is_prefix, int64_t& j0, int64_t& n) const {
    const int64_t npb = (P + kBlockK - 1) / kBlockK;
    is_prefix = blk < npb;
    j0 = (is_prefix ? blk : blk - npb) * kBlockK;
    n = std::min(kBlockK, (is_prefix ? P : seq_end) - j0);
    return is_prefix || !all_padded(kpm_row(b), j0, n);
  }
  uint64_t row_offset(int64_t b, int64_t h, int64_t i) const {
    return ((static_cast<uint64_t>(b) * Hq + h) * L + i) * static_cast<uint64_t>(P + S);
  }
};

// Prefix tensors as [T, Hkv, P, D] views (a 3-d prefix is T = 1).
template <typename T>
View4<T> prefix_view(const at::Tensor& t) {
  return View4<T>(t.dim() == 3 ? t.unsqueeze(0) : t);
}

// The query rows of one forward task: `nh` runs of the `m` queries [i0, i0 + m) of heads h0 .. h0 + nh - 1 (all
// on KV head hk), stacked as the rows of one tile.
struct RowBlock {
  int64_t b, hk, h0, nh, i0, m;
};

inline int64_t forward_tasks(const Problem& pr, bool stack) { return stack ? pr.B * pr.Hkv : pr.B * pr.Hq * pr.nqb; }

inline RowBlock forward_rows(const Problem& pr, bool stack, int64_t task) {
  if (stack) {
    const int64_t hk = task % pr.Hkv, b = task / pr.Hkv;
    return {b, hk, hk * pr.group, pr.group, 0, pr.L};
  }
  const int64_t qb = task % pr.nqb, bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq;
  return {b, h / pr.group, h, 1, qb * kBlockQ, std::min(kBlockQ, pr.L - qb * kBlockQ)};
}

template <typename T>
void forward_impl(const Problem& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pk, const at::Tensor& pv, at::Tensor& out, at::Tensor& lse) {
  const View4<T> Qv(q), Kv(k), Vv(v), PKv = prefix_view<T>(pk), PVv = prefix_view<T>(pv);
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t D = pr.D;
  const bool dropout = pr.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.f / (1.f - pr.dropout_p) : 1.f;

  const bool stack = pr.stack_group();
  at::parallel_for(0, forward_tasks(pr, stack), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(kBlockQ * D), kbuf(kBlockK * D), vbuf(kBlockK * D), sbuf(kBlockQ * kBlockK),
        zbuf(dropout ? kBlockQ * kBlockK : 0), acc(kBlockQ * D), mrow(kBlockQ), lrow(kBlockQ), alpha(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const RowBlock rb = forward_rows(pr, stack, task);
      const int64_t b = rb.b, hk = rb.hk, i0 = rb.i0, m = rb.m, rows = rb.nh * m, t = pr.prefix_of(b);
      int64_t ldq = D;
      const float* Q = qbuf.data();
      if (rb.nh == 1) {
        Q = block_rows(Qv, b, rb.h0, i0, m, D, qbuf.data(), ldq);
      } else {  // the group's heads stacked in qbuf
        for (int64_t g = 0; g < rb.nh; ++g) {
          float* dst = qbuf.data() + g * m * D;
          int64_t ld;
          const float* src = block_rows(Qv, b, rb.h0 + g, i0, m, D, dst, ld);
          if (src != dst)
            for (int64_t r = 0; r < m; ++r) std::copy(src + r * ld, src + r * ld + D, dst + r * D);
        }
      }
      std::fill(mrow.begin(), mrow.end(), kNegInf);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      const bool* kpm = pr.kpm_row(b);
      const int64_t seq_end = pr.seq_end(i0, m);
      for (int64_t blk = 0; blk < pr.key_blocks(seq_end); ++blk) {
        bool is_prefix;
        int64_t j0, n, ldk, ldv;
        if (!pr.key_block(b, seq_end, blk, is_prefix, j0, n)) continue;
        const float* K = block_rows(is_prefix ? PKv : Kv, is_prefix ? t : b, hk, j0, n, D, kbuf.data(), ldk);
        const float* V = block_rows(is_prefix ? PVv : Vv, is_prefix ? t : b, hk, j0, n, D, vbuf.data(), ldv);
        float* s = sbuf.data();
        gemm_rm(false, true, rows, n, D, pr.scale, Q, ldq, K, ldk, 0.f, s, n);
        if (!is_prefix)
          for (int64_t g = 0; g < rb.nh; ++g) mask_seq_tile(s + g * m * n, m, n, i0, j0, pr.causal, pr.shift(), kpm);
        softmax_update(s, rows, n, mrow.data(), lrow.data(), alpha.data());
        if (dropout) {
          for (int64_t g = 0; g < rb.nh; ++g)
            dropout_tile(zbuf.data() + g * m * n, m, n, pr.seed, pr.row_offset(b, rb.h0 + g, i0), pr.P + pr.S,
                         is_prefix ? j0 : pr.P + j0, pr.dropout_p, inv_keep);
          mul_inplace(s, zbuf.data(), rows * n);
        }
        scale_rows(acc.data(), rows, D, alpha.data());
        gemm_rm(false, false, rows, D, n, 1.f, s, n, V, ldv, 1.f, acc.data(), D);
      }
      for (int64_t g = 0; g < rb.nh; ++g) {
        T* o = out_p + ((b * pr.Hq + rb.h0 + g) * pr.L + i0) * D;
        float* ls = lse_p + (b * pr.Hq + rb.h0 + g) * pr.L + i0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t row = g * m + r;
          const bool empty = lrow[row] == 0.f;
          const float inv = empty ? 0.f : 1.f / lrow[row];
          for (int64_t d = 0; d < D; ++d) o[r * D + d] = static_cast<T>(acc[row * D + d] * inv);
          ls[r] = empty ? std::numeric_limits<float>::infinity() : mrow[row] + std::log(lrow[row]);
        }
      }
    }
  });
}

// Per-task scratch of the backward passes.
struct BwdScratch {
  std::vector<float> qbuf, dobuf, kbuf, vbuf, p, dp, z;
  BwdScratch(int64_t D, bool dropout)
      : qbuf(kBlockQ * D), dobuf(kBlockQ * D), kbuf(kBlockK * D), vbuf(kBlockK * D), p(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), z(dropout ? kBlockQ * kBlockK : 0) {}
};

// One tile of the backward: given Q, dO (m rows) and K, V (n rows), leaves P in sc.p, dS in sc.dp, and
// (with dropout) P * Z in sc.z. `seq_tile` applies the sequence masks.
inline void backward_tile(const Problem& pr, BwdScratch& sc, const float* Q, int64_t ldq, const float* dO,
                          int64_t lddo, const float* K, int64_t ldk, const float* V, int64_t ldv, int64_t m,
                          int64_t n, const float* lse, const float* delta, bool seq_tile, int64_t i0, int64_t j0,
                          const bool* kpm, uint64_t row_offset, uint64_t col0, float inv_keep) {
  const int64_t D = pr.D;
  float* p = sc.p.data();
  float* dp = sc.dp.data();
  gemm_rm(false, true, m, n, D, pr.scale, Q, ldq, K, ldk, 0.f, p, n);
  if (seq_tile) mask_seq_tile(p, m, n, i0, j0, pr.causal, pr.shift(), kpm);
  probs_from_lse(p, m, n, lse);
  gemm_rm(false, true, m, n, D, 1.f, dO, lddo, V, ldv, 0.f, dp, n);
  if (pr.dropout_p > 0.f) {
    float* z = sc.z.data();
    dropout_tile(z, m, n, pr.seed, row_offset, pr.P + pr.S, col0, pr.dropout_p, inv_keep);
    mul_inplace(dp, z, m * n);
    mul_inplace(z, p, m * n);  // z = P * Z, the dropped probabilities (for dV)
  }
  softmax_grad(p, dp, m, n, delta);
}

template <typename T>
void backward_impl(const Problem& pr, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out,
                   const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk,
                   at::Tensor& dpv) {
  const View4<T> Qv(q), Kv(k), Vv(v), PKv = prefix_view<T>(pk), PVv = prefix_view<T>(pv), dOv(dout), Ov(out);
  const int64_t D = pr.D, L = pr.L;
  const bool dropout = pr.dropout_p > 0.f;
  const float inv_keep = dropout ? 1.f / (1.f - pr.dropout_p) : 1.f;
  const float* lse_p = lse.data_ptr<float>();

  // delta = rowsum(dO * O), fp32 [B, Hq, L].
  at::Tensor delta_t = at::empty({pr.B, pr.Hq, L}, q.options().dtype(at::kFloat));
  float* delta_p = delta_t.data_ptr<float>();
  at::parallel_for(0, pr.B * pr.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / pr.Hq, h = bh % pr.Hq;
      for (int64_t i = 0; i < L; ++i) {
        const T* g = dOv.at(b, h, i);
        const T* o = Ov.at(b, h, i);
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(g[d * dOv.s3]) * static_cast<float>(o[d * Ov.s3]);
        delta_p[bh * L + i] = acc;
      }
    }
  });

  T* dq_p = dq.data_ptr<T>();
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dv.data_ptr<T>();
  const int64_t nkb = (pr.S + kBlockK - 1) / kBlockK;
  const int64_t npb = (pr.P + kBlockK - 1) / kBlockK;
  // Prefix gradients: one fp32 partial sum [T, Hkv, P, D] per chunk of batch rows (a fixed number of chunks,
  // a function of B only), added in chunk order at the end.
  const int64_t nchunks = std::min<int64_t>(kPrefixChunks, pr.B);
  const int64_t per_chunk = pr.T * pr.Hkv * pr.P * D;
  at::Tensor part_k = at::zeros({pr.P > 0 ? nchunks : 0, per_chunk}, q.options().dtype(at::kFloat));
  at::Tensor part_v = at::zeros({pr.P > 0 ? nchunks : 0, per_chunk}, q.options().dtype(at::kFloat));
  float* part_k_p = part_k.data_ptr<float>();
  float* part_v_p = part_v.data_ptr<float>();
  auto first_row = [&](int64_t c) { return pr.B * c / nchunks; };

  // Prefix key block pb of row b, KV head hk: its dk/dv into chunk c's partial sums, visiting (query block,
  // head) in a fixed order; with dq_rows ([group, L, D] fp32 of row b), also the prefix part of dq.
  auto prefix_block = [&](BwdScratch& sc, int64_t c, int64_t b, int64_t hk, int64_t pb, float* dq_rows) {
    const int64_t j0 = pb * kBlockK, n = std::min(kBlockK, pr.P - j0), t = pr.prefix_of(b);
    int64_t ldk, ldv;
    const float* K = block_rows(PKv, t, hk, j0, n, D, sc.kbuf.data(), ldk);
    const float* V = block_rows(PVv, t, hk, j0, n, D, sc.vbuf.data(), ldv);
    float* dkacc = part_k_p + c * per_chunk + ((t * pr.Hkv + hk) * pr.P + j0) * D;
    float* dvacc = part_v_p + c * per_chunk + ((t * pr.Hkv + hk) * pr.P + j0) * D;
    for (int64_t qb = 0; qb < pr.nqb; ++qb) {
      const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        const int64_t bh = b * pr.Hq + h;
        int64_t ldq, lddo;
        const float* Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data(), ldq);
        const float* dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data(), lddo);
        backward_tile(pr, sc, Q, ldq, dO, lddo, K, ldk, V, ldv, m, n, lse_p + bh * L + i0, delta_p + bh * L + i0,
                      false, i0, j0, nullptr, pr.row_offset(b, h, i0), j0, inv_keep);
        const float* pz = dropout ? sc.z.data() : sc.p.data();
        gemm_rm(true, false, n, D, m, 1.f, pz, n, dO, lddo, 1.f, dvacc, D);
        gemm_rm(true, false, n, D, m, pr.scale, sc.dp.data(), n, Q, ldq, 1.f, dkacc, D);
        if (dq_rows != nullptr)
          gemm_rm(false, false, m, D, n, pr.scale, sc.dp.data(), n, K, ldk, 1.f,
                  dq_rows + ((h - hk * pr.group) * L + i0) * D, D);
      }
    }
  };

  // Sequence key block kb of row b, KV head hk: its dk/dv, written out; with dq_rows, also its part of dq
  // (for the query blocks pass 1 would visit, so the sums match it bit for bit).
  auto seq_block = [&](BwdScratch& sc, float* dkacc, float* dvacc, int64_t b, int64_t hk, int64_t kb,
                       float* dq_rows) {
    const int64_t j0 = kb * kBlockK, n = std::min(kBlockK, pr.S - j0);
    std::fill(dkacc, dkacc + n * D, 0.f);
    std::fill(dvacc, dvacc + n * D, 0.f);
    const bool* kpm = pr.kpm_row(b);
    const int64_t i_min = pr.causal ? std::max<int64_t>(j0 - pr.shift(), 0) : 0;
    if (!all_padded(kpm, j0, n) && i_min < L) {
      int64_t ldk, ldv;
      const float* K = block_rows(Kv, b, hk, j0, n, D, sc.kbuf.data(), ldk);
      const float* V = block_rows(Vv, b, hk, j0, n, D, sc.vbuf.data(), ldv);
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        const int64_t bh = b * pr.Hq + h;
        for (int64_t qb = i_min / kBlockQ; qb < pr.nqb; ++qb) {
          const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
          int64_t ldq, lddo;
          const float* Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data(), ldq);
          const float* dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data(), lddo);
          backward_tile(pr, sc, Q, ldq, dO, lddo, K, ldk, V, ldv, m, n, lse_p + bh * L + i0,
                        delta_p + bh * L + i0, true, i0, j0, kpm, pr.row_offset(b, h, i0), pr.P + j0, inv_keep);
          const float* pz = dropout ? sc.z.data() : sc.p.data();
          gemm_rm(true, false, n, D, m, 1.f, pz, n, dO, lddo, 1.f, dvacc, D);
          gemm_rm(true, false, n, D, m, pr.scale, sc.dp.data(), n, Q, ldq, 1.f, dkacc, D);
          if (dq_rows != nullptr && j0 < pr.seq_end(i0, m))
            gemm_rm(false, false, m, D, n, pr.scale, sc.dp.data(), n, K, ldk, 1.f,
                    dq_rows + ((h - hk * pr.group) * L + i0) * D, D);
        }
      }
    }
    T* dkd = dk_p + ((b * pr.Hkv + hk) * pr.S + j0) * D;
    T* dvd = dv_p + ((b * pr.Hkv + hk) * pr.S + j0) * D;
    for (int64_t x = 0; x < n * D; ++x) {
      dkd[x] = static_cast<T>(dkacc[x]);
      dvd[x] = static_cast<T>(dvacc[x]);
    }
  };

  if (nchunks * pr.Hkv >= at::get_num_threads()) {
    // Enough (chunk, kv head) tasks for the threads: one pass, each tile computed once for dq, dk and dv.
    at::parallel_for(0, nchunks * pr.Hkv, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      std::vector<float> dkacc(kBlockK * D), dvacc(kBlockK * D), dq_rows(pr.group * L * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t hk = task % pr.Hkv, c = task / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b) {
          std::fill(dq_rows.begin(), dq_rows.end(), 0.f);
          for (int64_t pb = 0; pb < npb; ++pb) prefix_block(sc, c, b, hk, pb, dq_rows.data());
          for (int64_t kb = 0; kb < nkb; ++kb) seq_block(sc, dkacc.data(), dvacc.data(), b, hk, kb, dq_rows.data());
          T* dst = dq_p + (b * pr.Hq + hk * pr.group) * L * D;
          for (int64_t x = 0; x < pr.group * L * D; ++x) dst[x] = static_cast<T>(dq_rows[x]);
        }
      }
    });
  } else {
    // Few rows and KV heads for the threads: three passes with more tasks each (the same sums, the same bits).
    // Pass 1: dq per (b, h, query block).
    at::parallel_for(0, pr.B * pr.Hq * pr.nqb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      std::vector<float> dqacc(kBlockQ * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t qb = task % pr.nqb, bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq;
        const int64_t hk = h / pr.group, t = pr.prefix_of(b);
        const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
        int64_t ldq, lddo;
        const float* Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data(), ldq);
        const float* dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data(), lddo);
        const float* ls = lse_p + bh * L + i0;
        const float* dl = delta_p + bh * L + i0;
        std::fill(dqacc.begin(), dqacc.begin() + m * D, 0.f);
        const bool* kpm = pr.kpm_row(b);
        const int64_t seq_end = pr.seq_end(i0, m);
        for (int64_t blk = 0; blk < pr.key_blocks(seq_end); ++blk) {
          bool is_prefix;
          int64_t j0, n, ldk, ldv;
          if (!pr.key_block(b, seq_end, blk, is_prefix, j0, n)) continue;
          const float* K = block_rows(is_prefix ? PKv : Kv, is_prefix ? t : b, hk, j0, n, D, sc.kbuf.data(), ldk);
          const float* V = block_rows(is_prefix ? PVv : Vv, is_prefix ? t : b, hk, j0, n, D, sc.vbuf.data(), ldv);
          backward_tile(pr, sc, Q, ldq, dO, lddo, K, ldk, V, ldv, m, n, ls, dl, !is_prefix, i0, j0, kpm,
                        pr.row_offset(b, h, i0), is_prefix ? j0 : pr.P + j0, inv_keep);
          gemm_rm(false, false, m, D, n, pr.scale, sc.dp.data(), n, K, ldk, 1.f, dqacc.data(), D);
        }
        T* dst = dq_p + ((b * pr.Hq + h) * L + i0) * D;
        for (int64_t x = 0; x < m * D; ++x) dst[x] = static_cast<T>(dqacc[x]);
      }
    });
    // Pass 2: sequence dk, dv per (b, kv head, key block).
    at::parallel_for(0, pr.B * pr.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      std::vector<float> dkacc(kBlockK * D), dvacc(kBlockK * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t kb = task % nkb, bhk = task / nkb;
        seq_block(sc, dkacc.data(), dvacc.data(), bhk / pr.Hkv, bhk % pr.Hkv, kb, nullptr);
      }
    });
    // Pass 3: prefix dk, dv per (chunk, kv head, prefix key block).
    at::parallel_for(0, nchunks * pr.Hkv * npb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pb = task % npb, rest = task / npb, hk = rest % pr.Hkv, c = rest / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b) prefix_block(sc, c, b, hk, pb, nullptr);
      }
    });
  }
  if (pr.P == 0) return;

  T* dpk_p = dpk.data_ptr<T>();
  T* dpv_p = dpv.data_ptr<T>();
  at::parallel_for(0, per_chunk, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      float sk = 0.f, sv = 0.f;
      for (int64_t c = 0; c < nchunks; ++c) {
        sk += part_k_p[c * per_chunk + x];
        sv += part_v_p[c * per_chunk + x];
      }
      dpk_p[x] = static_cast<T>(sk);
      dpv_p[x] = static_cast<T>(sv);
    }
  });
}

// ---- argument checks and problem setup --------------------------------------------------------------------

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                     const at::Tensor& pv, const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& pidx,
                     bool causal, double scale, double dropout_p, int64_t seed, at::Tensor& kpm_c, at::Tensor& pidx_c) {
  TORCH_CHECK(q.dim() == 4, "prefix_kernels: q must be [B, Hq, L, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "prefix_kernels: k, v must be [B, Hkv, S, D], got ", k.sizes(),
              " and ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "prefix_kernels: the cpu kernels take float32, float16 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&k, &v, &pk, &pv}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prefix_kernels: q, k, v, prefix_k, prefix_v must share one dtype");
    TORCH_CHECK(t->device().is_cpu(), "prefix_kernels: the cpu kernels take cpu tensors");
  }
  Problem pr{};
  pr.B = q.size(0), pr.Hq = q.size(1), pr.L = q.size(2), pr.D = q.size(3);
  pr.Hkv = k.size(1), pr.S = k.size(2);
  TORCH_CHECK(k.size(0) == pr.B && k.size(3) == pr.D, "prefix_kernels: k must be [B, Hkv, S, D]");
  TORCH_CHECK(pr.Hkv > 0 && pr.Hq % pr.Hkv == 0, "prefix_kernels: Hq must be a multiple of Hkv");
  pr.group = pr.Hq / pr.Hkv;
  TORCH_CHECK(pv.sizes() == pk.sizes(), "prefix_kernels: prefix_v must have the shape of prefix_k");
  if (pidx.has_value()) {
    TORCH_CHECK(pk.dim() == 4 && pk.size(1) == pr.Hkv && pk.size(3) == pr.D,
                "prefix_kernels: prefix_k must be [T, Hkv, P, D] with prefix_index");
    pr.T = pk.size(0), pr.P = pk.size(2);
    TORCH_CHECK(pidx->scalar_type() == at::kLong && pidx->dim() == 1 && pidx->size(0) == pr.B,
                "prefix_kernels: prefix_index must be int64 [B]");
    pidx_c = pidx->contiguous();
    const int64_t* ip = pidx_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < pr.B; ++b)
      TORCH_CHECK(ip[b] >= 0 && ip[b] < pr.T, "prefix_kernels: prefix_index out of range [0, ", pr.T, ")");
    pr.pindex = ip;
  } else {
    TORCH_CHECK(pk.dim() == 3 && pk.size(0) == pr.Hkv && pk.size(2) == pr.D,
                "prefix_kernels: prefix_k must be [Hkv, P, D]");
    pr.T = 1, pr.P = pk.size(1);
    pr.pindex = nullptr;
  }
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool && kpm->dim() == 2 && kpm->size(0) == pr.B && kpm->size(1) == pr.S,
                "prefix_kernels: key_padding_mask must be bool [B, S]");
    kpm_c = kpm->contiguous();
    pr.kpm = kpm_c.data_ptr<bool>();
  } else {
    pr.kpm = nullptr;
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "prefix_kernels: dropout_p must lie in [0, 1)");
  pr.causal = causal;
  pr.scale = static_cast<float>(scale);
  pr.dropout_p = static_cast<float>(dropout_p);
  pr.seed = static_cast<uint64_t>(seed);
  pr.nqb = (pr.L + kBlockQ - 1) / kBlockQ;
  return pr;
}

std::tuple<at::Tensor, at::Tensor> cpp_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               const std::optional<at::Tensor>& prefix_index, bool causal,
                                               double scale, double dropout_p, int64_t seed) {
  at::Tensor kpm_c, pidx_c;
  const Problem pr =
      make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed, kpm_c, pidx_c);
  at::Tensor out = at::empty({pr.B, pr.Hq, pr.L, pr.D}, q.options());
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  switch (q.scalar_type()) {
    case at::kFloat: forward_impl<float>(pr, q, k, v, prefix_k, prefix_v, out, lse); break;
    case at::kHalf: forward_impl<at::Half>(pr, q, k, v, prefix_k, prefix_v, out, lse); break;
    case at::kBFloat16: forward_impl<at::BFloat16>(pr, q, k, v, prefix_k, prefix_v, out, lse); break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpp_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& prefix_index, bool causal,
    double scale, double dropout_p, int64_t seed) {
  at::Tensor kpm_c, pidx_c;
  const Problem pr =
      make_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed, kpm_c, pidx_c);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "prefix_kernels: grad_out and out must be shaped like q");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "prefix_kernels: grad_out and out must have the dtype of q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == pr.B && lse.size(1) == pr.Hq &&
                  lse.size(2) == pr.L,
              "prefix_kernels: lse must be float32 [B, Hq, L]");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dpk = at::zeros(prefix_k.sizes(), prefix_k.options());
  at::Tensor dpv = at::zeros(prefix_v.sizes(), prefix_v.options());
  switch (q.scalar_type()) {
    case at::kFloat: backward_impl<float>(pr, grad_out, q, k, v, prefix_k, prefix_v, out, lse_c, dq, dk, dv, dpk, dpv); break;
    case at::kHalf: backward_impl<at::Half>(pr, grad_out, q, k, v, prefix_k, prefix_v, out, lse_c, dq, dk, dv, dpk, dpv); break;
    case at::kBFloat16:
      backward_impl<at::BFloat16>(pr, grad_out, q, k, v, prefix_k, prefix_v, out, lse_c, dq, dk, dv, dpk, dpv);
      break;
    default: TORCH_CHECK(false, "unreachable");
  }
  return {dq, dk, dv, dpk, dpv};
}

at::Tensor cpp_dropout_mask_cpu(int64_t B, int64_t Hq, int64_t L, int64_t P, int64_t S, double dropout_p, int64_t seed) {
  TORCH_CHECK(B >= 0 && Hq >= 0 && L >= 0 && P >= 0 && S >= 0, "prefix_kernels: sizes must be >= 0");
  at::Tensor mask = at::empty({B, Hq, L, P + S}, at::TensorOptions().dtype(at::kBool));
  bool* mp = mask.data_ptr<bool>();
  const int64_t cols = P + S;
  const float p = static_cast<float>(dropout_p);
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, B * Hq * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t c = 0; c < cols; ++c)
        mp[row * cols + c] = dropout_keep(s, static_cast<uint64_t>(row * cols + c), p);
  });
  return mask;
}

}  // namespace
}  // namespace cpu
}  // namespace prefix_kernels

TORCH_LIBRARY_IMPL(prefix_kernels, CPU, m) {
  m.impl("cpp_fwd", &prefix_kernels::cpu::cpp_fwd_cpu);
  m.impl("cpp_bwd", &prefix_kernels::cpu::cpp_bwd_cpu);
}

// cpp_dropout_mask has no tensor arguments, so the dispatcher has no device to route on: register it for
// CompositeExplicitAutograd, which serves calls without tensor arguments. It always returns a CPU tensor.
TORCH_LIBRARY_IMPL(prefix_kernels, CompositeExplicitAutograd, m) {
  m.impl("cpp_dropout_mask", &prefix_kernels::cpu::cpp_dropout_mask_cpu);
}
