// CPU implementations of prefix_kernels::cpu_fwd and cpu_bwd (the op contract: docs/op.md).
//
// Flash-style: each task owns a block of at most kBlockQ queries of one (row, head), or in a decode-like
// forward every query of a GQA group, and walks the key blocks (prefix first, then the sequence) with an
// online softmax, so no [L, P + S] score matrix exists. Tiles are converted to fp32 once per block (fp32
// inputs with contiguous rows are used in place); the matrix products and the softmax of a tile run in
// block_math.cpp (AVX2/FMA or baseline loops, chosen at load time). Inputs and outputs are read and written
// through their strides. Backward recomputes the probabilities from the saved lse after bwd_preprocess
// (delta = rowsum(dO * O)), in one of two schedules:
//   fused        per (chunk of batch rows, kv head): every key block, prefix then sequence, against every
//                visible query block of the group's heads; each tile computed once gives dq (accumulated
//                per row in fp32), the sequence dk/dv, and the chunk's fp32 prefix partial sums
//                [T, Hkv, P, D]. Used when dq and a key gradient are wanted (the tiles are shared) and the
//                (chunk, kv head) tasks fill the threads;
//   three passes with more tasks each, any of them skipped when its gradient is not wanted:
//     bwd_dq       per (b, h, query block)
//     bwd_dkdv     per (b, kv head, sequence key block), looping over the group's heads and visible queries
//     bwd_dprefix  per (chunk, kv head, prefix key block)
// Both add the same terms in the same order (bitwise the same results, so the thread count and the
// output_mask may choose). The batch rows are split into a fixed number of chunks (a function of B only),
// each chunk sums the prefix gradients into its own buffer, and bwd_dprefix_reduce adds the chunks in order:
// the same bits for any thread count, and no tensor of B * P K/V elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "../problem.h"
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

// The writable view of an output; a default-constructed one stands for a gradient that is not wanted.
template <typename T>
struct OutView4 {
  T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  OutView4() = default;
  OutView4(const at::Tensor& t)
      : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  T* at(int64_t i0, int64_t i1, int64_t i2) const { return p + i0 * s0 + i1 * s1 + i2 * s2; }
  // Rows j0 .. j0 + n - 1 of head slice (i0, i1) = the n fp32 rows of D values at src, cast to T.
  void store(int64_t i0, int64_t i1, int64_t j0, const float* src, int64_t n, int64_t D) const {
    for (int64_t r = 0; r < n; ++r) {
      T* dst = at(i0, i1, j0 + r);
      const float* row = src + r * D;
      if (s3 == 1) {
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) dst[d * s3] = static_cast<T>(row[d]);
      }
    }
  }
};

// Prefix tensors as [T, Hkv, P, D] views (a 3-d prefix is T = 1).
inline at::Tensor as_prefix_4d(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

// fp32 rows: row r at p + r * ld.
struct Rows {
  const float* p;
  int64_t ld;
};

// `n` rows of D values (row stride s_row, column stride s_col) as fp32 rows. fp32 rows with contiguous
// columns are returned in place, everything else is converted into `buf`.
template <typename T>
inline Rows load_rows(const T* p, int64_t s_row, int64_t s_col, int64_t n, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (s_col == 1 && (s_row >= D || n == 1)) return {p, n == 1 ? D : s_row};
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
  return {buf, D};
}

// Rows j0 .. j0 + n - 1 of head slice (i0, i1) of a [., ., rows, D] view as fp32 rows (load_rows).
template <typename T>
inline Rows block_rows(const View4<T>& x, int64_t i0, int64_t i1, int64_t j0, int64_t n, int64_t D, float* buf) {
  return load_rows(x.at(i0, i1, j0), x.s2, x.s3, n, D, buf);
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

// The problem plus what the CPU block walk needs: the mask and index data, and the block counts.
struct CpuProblem : Problem {
  const bool* kpm = nullptr;        // [B, S] or null
  const int64_t* pindex = nullptr;  // [B] or null
  int64_t nqb = 0;                  // query blocks per (b, h)
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
  // blocks up to seq_end (seq_end(i0, m)). key_block gives block blk's kind, first key and size (a sequence
  // block ends at `end`, at most), and false for an all-padded sequence block (skipped).
  int64_t key_blocks(int64_t seq_end) const {
    return (P + kBlockK - 1) / kBlockK + (seq_end + kBlockK - 1) / kBlockK;
  }
  bool key_block(int64_t b, int64_t end, int64_t blk, bool& is_prefix, int64_t& j0, int64_t& n) const {
    const int64_t npb = (P + kBlockK - 1) / kBlockK;
    is_prefix = blk < npb;
    j0 = (is_prefix ? blk : blk - npb) * kBlockK;
    n = std::min(kBlockK, (is_prefix ? P : end) - j0);
    return is_prefix || !all_padded(kpm_row(b), j0, n);
  }
  uint64_t row_offset(int64_t b, int64_t h, int64_t i) const {
    return ((static_cast<uint64_t>(b) * Hq + h) * L + i) * static_cast<uint64_t>(P + S);
  }
};

// check_inputs' problem with contiguous copies of the mask and the index (kept alive by the caller in kpm_c,
// pidx_c). The prefix_index range check lives here: the CUDA implementation cannot read the index without a
// sync, and an index out of range would read outside the prefix bank.
CpuProblem cpu_problem(const Problem& base, const std::optional<at::Tensor>& kpm,
                       const std::optional<at::Tensor>& pidx, at::Tensor& kpm_c, at::Tensor& pidx_c) {
  CpuProblem pr;
  static_cast<Problem&>(pr) = base;
  if (pidx.has_value()) {
    pidx_c = pidx->contiguous();
    pr.pindex = pidx_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < pr.B; ++b)
      PREFIX_KERNELS_CHECK(pr.pindex[b] >= 0 && pr.pindex[b] < pr.T, "prefix_index out of range [0, ", pr.T, ")");
  }
  if (kpm.has_value()) {
    kpm_c = kpm->contiguous();
    pr.kpm = kpm_c.data_ptr<bool>();
  }
  pr.nqb = (pr.L + kBlockQ - 1) / kBlockQ;
  return pr;
}

// ---- forward ----------------------------------------------------------------------------------------------

// The query rows of one forward task: `nh` runs of the `m` queries [i0, i0 + m) of heads h0 .. h0 + nh - 1 (all
// on KV head hk), stacked as the rows of one tile.
struct RowBlock {
  int64_t b, hk, h0, nh, i0, m;
};

inline int64_t forward_tasks(const CpuProblem& pr, bool stack) {
  return stack ? pr.B * pr.Hkv : pr.B * pr.Hq * pr.nqb;
}

inline RowBlock forward_rows(const CpuProblem& pr, bool stack, int64_t task) {
  if (stack) {
    const int64_t hk = task % pr.Hkv, b = task / pr.Hkv;
    return {b, hk, hk * pr.group, pr.group, 0, pr.L};
  }
  const int64_t qb = task % pr.nqb, bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq;
  return {b, h / pr.group, h, 1, qb * kBlockQ, std::min(kBlockQ, pr.L - qb * kBlockQ)};
}

template <typename T>
void forward(const CpuProblem& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& pk, const at::Tensor& pv, at::Tensor& out, at::Tensor& lse) {
  const View4<T> Qv(q), Kv(k), Vv(v), PKv(as_prefix_4d(pk)), PVv(as_prefix_4d(pv));
  const OutView4<T> Ov(out);
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
      Rows Q{qbuf.data(), D};
      if (rb.nh == 1) {
        Q = block_rows(Qv, b, rb.h0, i0, m, D, qbuf.data());
      } else {  // the group's heads stacked in qbuf
        for (int64_t g = 0; g < rb.nh; ++g) {
          float* dst = qbuf.data() + g * m * D;
          const Rows src = block_rows(Qv, b, rb.h0 + g, i0, m, D, dst);
          if (src.p != dst)
            for (int64_t r = 0; r < m; ++r) std::copy(src.p + r * src.ld, src.p + r * src.ld + D, dst + r * D);
        }
      }
      std::fill(mrow.begin(), mrow.end(), kNegInf);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      const bool* kpm = pr.kpm_row(b);
      const int64_t seq_end = pr.seq_end(i0, m);
      for (int64_t blk = 0; blk < pr.key_blocks(seq_end); ++blk) {
        bool is_prefix;
        int64_t j0, n;
        if (!pr.key_block(b, seq_end, blk, is_prefix, j0, n)) continue;
        const Rows K = block_rows(is_prefix ? PKv : Kv, is_prefix ? t : b, hk, j0, n, D, kbuf.data());
        const Rows V = block_rows(is_prefix ? PVv : Vv, is_prefix ? t : b, hk, j0, n, D, vbuf.data());
        float* s = sbuf.data();
        gemm_rm(false, true, rows, n, D, pr.scale, Q.p, Q.ld, K.p, K.ld, 0.f, s, n);
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
        gemm_rm(false, false, rows, D, n, 1.f, s, n, V.p, V.ld, 1.f, acc.data(), D);
      }
      for (int64_t g = 0; g < rb.nh; ++g) {
        float* ls = lse_p + (b * pr.Hq + rb.h0 + g) * pr.L + i0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t row = g * m + r;
          const bool empty = lrow[row] == 0.f;
          const float inv = empty ? 0.f : 1.f / lrow[row];
          T* o = Ov.at(b, rb.h0 + g, i0 + r);
          const float* a = acc.data() + row * D;
          if (Ov.s3 == 1) {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
          } else {
            for (int64_t d = 0; d < D; ++d) o[d * Ov.s3] = static_cast<T>(a[d] * inv);
          }
          ls[r] = empty ? std::numeric_limits<float>::infinity() : mrow[row] + std::log(lrow[row]);
        }
      }
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------------------

// Per-task scratch of the backward passes.
struct BwdScratch {
  std::vector<float> qbuf, dobuf, kbuf, vbuf, p, dp, z;
  BwdScratch(int64_t D, bool dropout)
      : qbuf(kBlockQ * D), dobuf(kBlockQ * D), kbuf(kBlockK * D), vbuf(kBlockK * D), p(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), z(dropout ? kBlockQ * kBlockK : 0) {}
};

// One backward call: the inputs, the fp32 workspaces (delta, the prefix partial sums) and the outputs shared
// by its steps. run() does bwd_preprocess, then the fused pass or the three passes, then bwd_dprefix_reduce.
template <typename T>
class Backward {
 public:
  Backward(const CpuProblem& pr, Wanted want, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
           const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out,
           const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
           const at::Tensor& dpk, const at::Tensor& dpv)
      : pr(pr), want(want), Qv(q), Kv(k), Vv(v), PKv(as_prefix_4d(pk)), PVv(as_prefix_4d(pv)), dOv(dout), Ov(out),
        lse_p(lse.data_ptr<float>()), dropout(pr.dropout_p > 0.f),
        inv_keep(dropout ? 1.f / (1.f - pr.dropout_p) : 1.f), nkb((pr.S + kBlockK - 1) / kBlockK),
        npb((pr.P + kBlockK - 1) / kBlockK), nchunks(std::min<int64_t>(kPrefixChunks, pr.B)),
        per_chunk(pr.T * pr.Hkv * pr.P * pr.D) {
    if (want.dq) dQv = OutView4<T>(dq);
    if (want.dkdv) dKv = OutView4<T>(dk), dVv = OutView4<T>(dv);
    if (want.dprefix) dPKv = OutView4<T>(as_prefix_4d(dpk)), dPVv = OutView4<T>(as_prefix_4d(dpv));
    const auto f32 = q.options().dtype(at::kFloat);
    delta = at::empty({pr.B, pr.Hq, pr.L}, f32);
    delta_p = delta.data_ptr<float>();
    const int64_t parts = want.dprefix && pr.P > 0 ? nchunks : 0;
    part_k = at::zeros({parts, per_chunk}, f32);
    part_v = at::zeros({parts, per_chunk}, f32);
    part_k_p = part_k.data_ptr<float>();
    part_v_p = part_v.data_ptr<float>();
  }

  void run() {
    bwd_preprocess();
    if (fuse()) {
      bwd_fused();
    } else {
      if (want.dq) bwd_dq();
      if (want.dkdv) bwd_dkdv();
      if (want.dprefix) bwd_dprefix();
    }
    if (want.dprefix && pr.P > 0) bwd_dprefix_reduce();
  }

 private:
  // The fused pass shares each tile between dq and the key gradients: worth it when dq and one of them are
  // wanted and the (chunk, kv head) tasks fill the threads. Otherwise the passes have more tasks.
  bool fuse() const { return want.dq && (want.dkdv || want.dprefix) && nchunks * pr.Hkv >= at::get_num_threads(); }

  int64_t first_row(int64_t c) const { return pr.B * c / nchunks; }

  // delta = rowsum(dO * O), fp32 [B, Hq, L]: the softmax-gradient term of every query row.
  void bwd_preprocess() {
    const int64_t D = pr.D, L = pr.L;
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
  }

  // One tile: query rows [i0, i0 + m) of (b, h) against keys [j0, j0 + n) of the prefix or the sequence.
  // Leaves P in sc.p, dS in sc.dp and, with dropout and need_pz, the dropped probabilities P * Z in sc.z
  // (only dV reads them).
  void tile(BwdScratch& sc, Rows Q, Rows dO, Rows K, Rows V, int64_t m, int64_t n, int64_t b, int64_t h, int64_t i0,
            int64_t j0, bool is_prefix, bool need_pz) const {
    const int64_t D = pr.D, row0 = (b * pr.Hq + h) * pr.L + i0;
    float* p = sc.p.data();
    float* dp = sc.dp.data();
    gemm_rm(false, true, m, n, D, pr.scale, Q.p, Q.ld, K.p, K.ld, 0.f, p, n);
    if (!is_prefix) mask_seq_tile(p, m, n, i0, j0, pr.causal, pr.shift(), pr.kpm_row(b));
    probs_from_lse(p, m, n, lse_p + row0);
    gemm_rm(false, true, m, n, D, 1.f, dO.p, dO.ld, V.p, V.ld, 0.f, dp, n);
    if (dropout) {
      float* z = sc.z.data();
      dropout_tile(z, m, n, pr.seed, pr.row_offset(b, h, i0), pr.P + pr.S, is_prefix ? j0 : pr.P + j0,
                   pr.dropout_p, inv_keep);
      mul_inplace(dp, z, m * n);
      if (need_pz) mul_inplace(z, p, m * n);
    }
    softmax_grad(p, dp, m, n, delta_p + row0);
  }

  // The tile's dV += (P Z)^T dO and dK += scale dS^T Q (fp32 rows of its n keys).
  void add_dkdv(const BwdScratch& sc, Rows Q, Rows dO, int64_t m, int64_t n, float* dkacc, float* dvacc) const {
    const float* pz = dropout ? sc.z.data() : sc.p.data();
    gemm_rm(true, false, n, pr.D, m, 1.f, pz, n, dO.p, dO.ld, 1.f, dvacc, pr.D);
    gemm_rm(true, false, n, pr.D, m, pr.scale, sc.dp.data(), n, Q.p, Q.ld, 1.f, dkacc, pr.D);
  }

  // The tile's dQ += scale dS K (fp32 rows of its m queries).
  void add_dq(const BwdScratch& sc, Rows K, int64_t m, int64_t n, float* dqacc) const {
    gemm_rm(false, false, m, pr.D, n, pr.scale, sc.dp.data(), n, K.p, K.ld, 1.f, dqacc, pr.D);
  }

  // Prefix key block pb of row b, KV head hk, against every (query block, head of the group) in a fixed order:
  // with want.dprefix its dk/dv into chunk c's partial sums; with dq_rows ([group, L, D] fp32 of row b) the
  // prefix part of dq.
  void prefix_block(BwdScratch& sc, int64_t c, int64_t b, int64_t hk, int64_t pb, float* dq_rows) const {
    const int64_t D = pr.D, L = pr.L, j0 = pb * kBlockK, n = std::min(kBlockK, pr.P - j0), t = pr.prefix_of(b);
    const Rows K = block_rows(PKv, t, hk, j0, n, D, sc.kbuf.data());
    const Rows V = block_rows(PVv, t, hk, j0, n, D, sc.vbuf.data());
    const int64_t part0 = c * per_chunk + ((t * pr.Hkv + hk) * pr.P + j0) * D;
    for (int64_t qb = 0; qb < pr.nqb; ++qb) {
      const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        const Rows Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data());
        const Rows dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data());
        tile(sc, Q, dO, K, V, m, n, b, h, i0, j0, true, want.dprefix);
        if (want.dprefix) add_dkdv(sc, Q, dO, m, n, part_k_p + part0, part_v_p + part0);
        if (dq_rows != nullptr) add_dq(sc, K, m, n, dq_rows + ((h - hk * pr.group) * L + i0) * D);
      }
    }
  }

  // Sequence key block kb of row b, KV head hk: with want.dkdv its dk/dv, written out; with dq_rows also its
  // part of dq (for the query blocks bwd_dq would visit, so the sums match it bit for bit).
  void seq_block(BwdScratch& sc, float* dkacc, float* dvacc, int64_t b, int64_t hk, int64_t kb,
                 float* dq_rows) const {
    const int64_t D = pr.D, L = pr.L, j0 = kb * kBlockK, n = std::min(kBlockK, pr.S - j0);
    if (want.dkdv) {
      std::fill(dkacc, dkacc + n * D, 0.f);
      std::fill(dvacc, dvacc + n * D, 0.f);
    }
    const bool* kpm = pr.kpm_row(b);
    const int64_t i_min = pr.causal ? std::max<int64_t>(j0 - pr.shift(), 0) : 0;
    if (!all_padded(kpm, j0, n) && i_min < L) {
      const Rows K = block_rows(Kv, b, hk, j0, n, D, sc.kbuf.data());
      const Rows V = block_rows(Vv, b, hk, j0, n, D, sc.vbuf.data());
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        for (int64_t qb = i_min / kBlockQ; qb < pr.nqb; ++qb) {
          const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
          const bool dq_here = dq_rows != nullptr && j0 < pr.seq_end(i0, m);
          if (!want.dkdv && !dq_here) continue;
          const Rows Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data());
          const Rows dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data());
          tile(sc, Q, dO, K, V, m, n, b, h, i0, j0, false, want.dkdv);
          if (want.dkdv) add_dkdv(sc, Q, dO, m, n, dkacc, dvacc);
          if (dq_here) add_dq(sc, K, m, n, dq_rows + ((h - hk * pr.group) * L + i0) * D);
        }
      }
    }
    if (want.dkdv) {
      dKv.store(b, hk, j0, dkacc, n, D);
      dVv.store(b, hk, j0, dvacc, n, D);
    }
  }

  // One task per (chunk of batch rows, kv head): every key block of each row, prefix then sequence.
  void bwd_fused() {
    const int64_t D = pr.D, L = pr.L;
    at::parallel_for(0, nchunks * pr.Hkv, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      std::vector<float> dkacc(want.dkdv ? kBlockK * D : 0), dvacc(want.dkdv ? kBlockK * D : 0),
          dq_buf(want.dq ? pr.group * L * D : 0);
      float* dq_rows = want.dq ? dq_buf.data() : nullptr;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t hk = task % pr.Hkv, c = task / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b) {
          if (dq_rows != nullptr) std::fill(dq_buf.begin(), dq_buf.end(), 0.f);
          if (dq_rows != nullptr || want.dprefix)
            for (int64_t pb = 0; pb < npb; ++pb) prefix_block(sc, c, b, hk, pb, dq_rows);
          if (dq_rows != nullptr || want.dkdv)
            for (int64_t kb = 0; kb < nkb; ++kb) seq_block(sc, dkacc.data(), dvacc.data(), b, hk, kb, dq_rows);
          if (dq_rows != nullptr)
            for (int64_t g = 0; g < pr.group; ++g) dQv.store(b, hk * pr.group + g, 0, dq_rows + g * L * D, L, D);
        }
      }
    });
  }

  // dq per (b, h, query block): the walk of the forward, key block by key block.
  void bwd_dq() {
    const int64_t D = pr.D, L = pr.L;
    at::parallel_for(0, pr.B * pr.Hq * pr.nqb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout);
      std::vector<float> dqacc(kBlockQ * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t qb = task % pr.nqb, bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq;
        const int64_t hk = h / pr.group, t = pr.prefix_of(b);
        const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, L - i0);
        const Rows Q = block_rows(Qv, b, h, i0, m, D, sc.qbuf.data());
        const Rows dO = block_rows(dOv, b, h, i0, m, D, sc.dobuf.data());
        std::fill(dqacc.begin(), dqacc.begin() + m * D, 0.f);
        const int64_t seq_end = pr.seq_end(i0, m);
        for (int64_t blk = 0; blk < pr.key_blocks(seq_end); ++blk) {
          bool is_prefix;
          int64_t j0, n;
          // The blocks of the forward's walk, but each sequence block whole (end S, not seq_end; the keys
          // past seq_end are masked), as seq_block computes it: gemm_rm rounds a column in its vector body
          // and in its scalar tail differently, so only tiles of the fused pass's widths give its dq bit
          // for bit.
          if (!pr.key_block(b, pr.S, blk, is_prefix, j0, n)) continue;
          const Rows K = block_rows(is_prefix ? PKv : Kv, is_prefix ? t : b, hk, j0, n, D, sc.kbuf.data());
          const Rows V = block_rows(is_prefix ? PVv : Vv, is_prefix ? t : b, hk, j0, n, D, sc.vbuf.data());
          tile(sc, Q, dO, K, V, m, n, b, h, i0, j0, is_prefix, false);
          add_dq(sc, K, m, n, dqacc.data());
        }
        dQv.store(b, h, i0, dqacc.data(), m, D);
      }
    });
  }

  // Sequence dk, dv per (b, kv head, key block).
  void bwd_dkdv() {
    at::parallel_for(0, pr.B * pr.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(pr.D, dropout);
      std::vector<float> dkacc(kBlockK * pr.D), dvacc(kBlockK * pr.D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t kb = task % nkb, bhk = task / nkb;
        seq_block(sc, dkacc.data(), dvacc.data(), bhk / pr.Hkv, bhk % pr.Hkv, kb, nullptr);
      }
    });
  }

  // Prefix dk, dv partial sums per (chunk, kv head, prefix key block).
  void bwd_dprefix() {
    at::parallel_for(0, nchunks * pr.Hkv * npb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(pr.D, dropout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pb = task % npb, rest = task / npb, hk = rest % pr.Hkv, c = rest / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b) prefix_block(sc, c, b, hk, pb, nullptr);
      }
    });
  }

  // dprefix = the chunks' partial sums added in chunk order, per element.
  void bwd_dprefix_reduce() {
    const int64_t D = pr.D, rows = pr.T * pr.Hkv * pr.P;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t j = row % pr.P, hk = (row / pr.P) % pr.Hkv, t = row / (pr.P * pr.Hkv);
        T* dk = dPKv.at(t, hk, j);
        T* dv = dPVv.at(t, hk, j);
        for (int64_t d = 0; d < D; ++d) {
          const int64_t x = row * D + d;
          float sk = 0.f, sv = 0.f;
          for (int64_t c = 0; c < nchunks; ++c) {
            sk += part_k_p[c * per_chunk + x];
            sv += part_v_p[c * per_chunk + x];
          }
          dk[d * dPKv.s3] = static_cast<T>(sk);
          dv[d * dPVv.s3] = static_cast<T>(sv);
        }
      }
    });
  }

  const CpuProblem& pr;
  const Wanted want;
  const View4<T> Qv, Kv, Vv, PKv, PVv, dOv, Ov;
  OutView4<T> dQv, dKv, dVv, dPKv, dPVv;
  const float* lse_p;
  const bool dropout;
  const float inv_keep;
  const int64_t nkb, npb;
  // Prefix gradients: one fp32 partial sum [T, Hkv, P, D] per chunk of batch rows.
  const int64_t nchunks, per_chunk;
  at::Tensor delta, part_k, part_v;
  float* delta_p = nullptr;
  float* part_k_p = nullptr;
  float* part_v_p = nullptr;
};

// ---- the ops ----------------------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: PREFIX_KERNELS_CHECK(false, "unsupported dtype ", dtype);
  }
}

// `deterministic` is part of every backend's schema; the CPU kernels are always deterministic.
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                       const std::optional<at::Tensor>& key_padding_mask,
                                       const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& sinks, bool causal, int64_t window, double softcap, double scale,
                                       double dropout_p, int64_t seed, bool /*deterministic*/) {
  refuse_features("cpu", cu_seqlens, sinks, window, softcap);
  at::Tensor kpm_c, pidx_c;
  const CpuProblem pr = cpu_problem(check_inputs(at::kCPU, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                 prefix_index, causal, scale, dropout_p, seed),
                                    key_padding_mask, prefix_index, kpm_c, pidx_c);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    forward<decltype(t)>(pr, q, k, v, prefix_k, prefix_v, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& sinks, bool causal, int64_t window, double softcap,
    double scale, double dropout_p, int64_t seed, bool /*deterministic*/, std::array<bool, 3> output_mask) {
  refuse_features("cpu", cu_seqlens, sinks, window, softcap);
  at::Tensor kpm_c, pidx_c;
  const CpuProblem pr = cpu_problem(check_inputs(at::kCPU, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                 prefix_index, causal, scale, dropout_p, seed),
                                    key_padding_mask, prefix_index, kpm_c, pidx_c);
  check_backward_inputs(pr, q, grad_out, out, lse);
  const Wanted want(output_mask);
  at::Tensor dq = gradient_like(q, want.dq);
  at::Tensor dk = gradient_like(k, want.dkdv), dv = gradient_like(v, want.dkdv);
  at::Tensor dpk = gradient_like(prefix_k, want.dprefix), dpv = gradient_like(prefix_v, want.dprefix);
  if (!want.any()) return {dq, dk, dv, dpk, dpv};
  const at::Tensor lse_c = lse.contiguous();
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    Backward<decltype(t)>(pr, want, grad_out, q, k, v, prefix_k, prefix_v, out, lse_c, dq, dk, dv, dpk, dpv).run();
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace cpu
}  // namespace prefix_kernels

// The schemas are defined by prefix_kernels.ops (Python) before it loads this library.
TORCH_LIBRARY_IMPL(prefix_kernels, CPU, m) {
  m.impl("cpu_fwd", &prefix_kernels::cpu::fwd);
  m.impl("cpu_bwd", &prefix_kernels::cpu::bwd);
}
