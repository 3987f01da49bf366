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
//
// The walks run over rows (Row): a batch row, or one packed sequence of the one batch row (cu_seqlens), which
// is a row of its own with its own length and prefix placed at an offset in the batch row; so a packed
// sequence's blocks never reach into another's. A sliding window bounds each query block's sequence keys from
// below as causality bounds them from above, and each key block's queries from above: only the blocks between
// are visited. Soft-capping bends a tile's scores before the mask (backward keeps tanh for its derivative); a
// sink only enters a row's softmax denominator when the forward finishes the row, and through lse the backward.
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
constexpr float kInf = std::numeric_limits<float>::infinity();
static_assert(kBlockQ == kBlockK, "a packed sequence's query blocks are its key blocks (CpuProblem::block_start)");

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

// One row of the block walks: batch row b, or a packed sequence of it at positions [off, off + L) (its queries
// and its keys: L = S). Positions within the row (i, j) count from off; the tensors, the lse and the dropout
// counters are indexed by the batch row's positions off + i, off + j.
struct Row {
  int64_t b, off, L, S, t;  // batch row, offset, queries, keys, prefix
  const bool* kpm;          // the row's S padding flags, or null
  int64_t shift() const { return S - L; }
  int64_t query_blocks() const { return (L + kBlockQ - 1) / kBlockQ; }
  int64_t key_blocks() const { return (S + kBlockK - 1) / kBlockK; }
};

// Hide sequence keys [j0, j0 + n) of query rows [i0, i0 + m) of `row`: padding, causal (j <= i') and the
// window (i' - j < window), with i' = i + shift.
inline void mask_seq_tile(float* s, int64_t m, int64_t n, int64_t i0, int64_t j0, const Row& row, bool causal,
                          int64_t window) {
  const bool* kpm = row.kpm;
  const int64_t shift = row.shift();
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
  if (window > 0 && j0 <= i0 + m - 1 + shift - window) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t first_seen = std::min<int64_t>(std::max<int64_t>(i0 + r + shift - window + 1 - j0, 0), n);
      for (int64_t c = 0; c < first_seen; ++c) s[r * n + c] = kNegInf;
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

// The problem plus what the CPU block walk needs: the mask, index, packing and sink data, the features, and
// the block counts.
struct CpuProblem : Problem {
  const bool* kpm = nullptr;        // [B, S] or null
  const int64_t* pindex = nullptr;  // [B] ([n] when packed) or null
  const int32_t* cu = nullptr;      // [n + 1] when packed, else null
  int64_t nseq = 0;                 // n
  const float* sinks = nullptr;     // [Hq] fp32 or null
  int64_t window = 0;               // 0 = off
  float softcap = 0.f;              // 0 = off
  // Query and key blocks per batch row: a packed row's are its sequences' (each sequence starts a block).
  int64_t nqb = 0, nkb = 0;
  // Packed: block_start[s] = the blocks of the sequences before s (a sequence's query blocks are its key
  // blocks, as L = S and kBlockQ = kBlockK).
  std::vector<int64_t> block_start;

  // Decode-like forwards stack the GQA group's queries (every query of the group's heads) in one tile, so each
  // K/V tile is read once per KV head instead of once per query head, when that leaves a task per thread.
  // At most kStackRows rows: like a single head's rows they take gemm_rm's dot-product path, so each row's
  // result is bitwise the same stacked or not, and the thread count may decide.
  bool stack_group() const {
    return cu == nullptr && group > 1 && group * L <= kStackRows && B * Hkv >= at::get_num_threads();
  }
  int64_t prefix_of(int64_t b) const { return pindex ? pindex[b] : 0; }
  const bool* kpm_row(int64_t b) const { return kpm ? kpm + b * S : nullptr; }
  int64_t rows_in(int64_t /*b*/) const { return cu ? nseq : 1; }
  // Row r of batch row b (r < rows_in(b)).
  Row row(int64_t b, int64_t r) const {
    if (cu == nullptr) return {b, 0, L, S, prefix_of(b), kpm_row(b)};
    const int64_t off = cu[r], len = cu[r + 1] - off;
    return {b, off, len, len, pindex ? pindex[r] : 0, nullptr};
  }
  // The row of block `blk` (< nqb, or < nkb) of batch row b, and the block's index within that row.
  Row row_of_block(int64_t b, int64_t blk, int64_t& local) const {
    if (cu == nullptr) {
      local = blk;
      return row(b, 0);
    }
    // the last sequence starting at or before blk: empty sequences start where their successor does
    const int64_t r = std::upper_bound(block_start.begin(), block_start.end(), blk) - block_start.begin() - 1;
    local = blk - block_start[r];
    return row(b, r);
  }
  // The sequence keys [seq_begin, seq_end) of `row` that some query of [i0, i0 + m) may see: the window bounds
  // them from below, causality from above (a query's visible keys are one run, and consecutive queries'
  // runs overlap or touch, so the union is one run too).
  int64_t seq_begin(const Row& row, int64_t i0) const {
    return window > 0 ? std::clamp<int64_t>(i0 + row.shift() - window + 1, 0, row.S) : 0;
  }
  int64_t seq_end(const Row& row, int64_t i0, int64_t m) const {
    return causal ? std::clamp<int64_t>(i0 + m + row.shift(), 0, row.S) : row.S;
  }
  // The queries [query_begin, query_end) of `row` that may see some key of [j0, j0 + n).
  int64_t query_begin(const Row& row, int64_t j0) const {
    return causal ? std::clamp<int64_t>(j0 - row.shift(), 0, row.L) : 0;
  }
  int64_t query_end(const Row& row, int64_t j0, int64_t n) const {
    return window > 0 ? std::clamp<int64_t>(j0 + n - 1 + window - row.shift(), 0, row.L) : row.L;
  }
  // The key blocks of a walk over query rows [i0, i0 + m) of `row`: the prefix blocks, then the sequence
  // blocks holding [seq_begin, seq_end). Sequence blocks stay aligned to the row's multiples of kBlockK, so
  // every walk computes a key block with the same tile as seq_block (bwd_dq relies on it).
  struct KeyWalk {
    int64_t npb, kb0, kb1;  // prefix blocks; sequence blocks [kb0, kb1)
    int64_t count() const { return npb + kb1 - kb0; }
  };
  KeyWalk key_walk(const Row& row, int64_t i0, int64_t m) const {
    const int64_t npb = (P + kBlockK - 1) / kBlockK, begin = seq_begin(row, i0), end = seq_end(row, i0, m);
    if (begin >= end) return {npb, 0, 0};
    return {npb, begin / kBlockK, (end + kBlockK - 1) / kBlockK};
  }
  // Block blk of walk w: its kind, first key and size (a sequence block ends at `end`, at most), and false for
  // an all-padded sequence block (skipped).
  bool key_block(const Row& row, const KeyWalk& w, int64_t end, int64_t blk, bool& is_prefix, int64_t& j0,
                 int64_t& n) const {
    is_prefix = blk < w.npb;
    j0 = (is_prefix ? blk : blk - w.npb + w.kb0) * kBlockK;
    n = std::min(kBlockK, (is_prefix ? P : end) - j0);
    return is_prefix || !all_padded(row.kpm, j0, n);
  }
  // The dropout counter of query i (of the batch row) of head h, and of a tile's first key column: a packed
  // sequence counts along its batch row (docs/op.md).
  uint64_t row_offset(int64_t b, int64_t h, int64_t i) const {
    return ((static_cast<uint64_t>(b) * Hq + h) * L + i) * static_cast<uint64_t>(P + S);
  }
  uint64_t column(const Row& row, bool is_prefix, int64_t j0) const {
    return static_cast<uint64_t>(is_prefix ? j0 : P + row.off + j0);
  }
  const float* sink(int64_t h) const { return sinks ? sinks + h : nullptr; }
};

// The tensors a CpuProblem points into: contiguous (fp32 sinks) copies of the inputs that need one.
struct Held {
  at::Tensor kpm, pidx, cu, sinks;
};

// check_inputs' problem with the features and what it reads (kept alive in `held`). The prefix_index range and
// cu_seqlens value checks live here: the CUDA implementation cannot read them without a sync, and a bad value
// would read outside the prefix bank or the row.
CpuProblem cpu_problem(const Problem& base, const std::optional<at::Tensor>& kpm,
                       const std::optional<at::Tensor>& pidx, const std::optional<at::Tensor>& cu_seqlens,
                       const std::optional<at::Tensor>& sinks, int64_t window, double softcap, Held& held) {
  CpuProblem pr;
  static_cast<Problem&>(pr) = base;
  if (cu_seqlens.has_value()) {
    held.cu = cu_seqlens->contiguous();
    pr.cu = held.cu.data_ptr<int32_t>();
    pr.nseq = held.cu.numel() - 1;
    PREFIX_KERNELS_CHECK(pr.cu[0] == 0 && pr.cu[pr.nseq] == pr.S, "cu_seqlens must start at 0 and end at S");
    pr.block_start.assign(pr.nseq + 1, 0);
    for (int64_t r = 0; r < pr.nseq; ++r) {
      PREFIX_KERNELS_CHECK(pr.cu[r + 1] >= pr.cu[r], "cu_seqlens must never decrease");
      pr.block_start[r + 1] = pr.block_start[r] + pr.row(0, r).query_blocks();
    }
  }
  if (pidx.has_value()) {
    held.pidx = pidx->contiguous();
    pr.pindex = held.pidx.data_ptr<int64_t>();
    for (int64_t r = 0; r < held.pidx.numel(); ++r)
      PREFIX_KERNELS_CHECK(pr.pindex[r] >= 0 && pr.pindex[r] < pr.T, "prefix_index out of range [0, ", pr.T, ")");
  }
  if (kpm.has_value()) {
    held.kpm = kpm->contiguous();
    pr.kpm = held.kpm.data_ptr<bool>();
  }
  if (sinks.has_value()) {
    held.sinks = sinks->to(at::kFloat).contiguous();
    pr.sinks = held.sinks.data_ptr<float>();
  }
  pr.window = window;
  pr.softcap = static_cast<float>(softcap);
  pr.nqb = pr.cu ? pr.block_start.back() : (pr.L + kBlockQ - 1) / kBlockQ;
  pr.nkb = pr.cu ? pr.block_start.back() : (pr.S + kBlockK - 1) / kBlockK;
  return pr;
}

// ---- forward ----------------------------------------------------------------------------------------------

// The query rows of one forward task: `nh` runs of the `m` queries [i0, i0 + m) of `row` of heads h0 .. h0 +
// nh - 1 (all on KV head hk), stacked as the rows of one tile.
struct RowBlock {
  Row row;
  int64_t hk, h0, nh, i0, m;
};

inline int64_t forward_tasks(const CpuProblem& pr, bool stack) {
  return stack ? pr.B * pr.Hkv : pr.B * pr.Hq * pr.nqb;
}

inline RowBlock forward_rows(const CpuProblem& pr, bool stack, int64_t task) {
  if (stack) {
    const int64_t hk = task % pr.Hkv, b = task / pr.Hkv;
    return {pr.row(b, 0), hk, hk * pr.group, pr.group, 0, pr.L};
  }
  const int64_t bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq;
  int64_t qb;
  const Row row = pr.row_of_block(b, task % pr.nqb, qb);
  return {row, h / pr.group, h, 1, qb * kBlockQ, std::min(kBlockQ, row.L - qb * kBlockQ)};
}

// A finished row of the online softmax (max m, sum l of exp(score - m)): lse, and the factor that turns its
// accumulator into the output. A sink adds exp(sink) to the denominator (summed at max(m, sink): either may
// dwarf the other); a row with no visible key outputs zeros, its lse the sink's (+inf without one).
inline float finish_row(float m, float l, const float* sink, float& lse) {
  if (l == 0.f) {
    lse = sink != nullptr && *sink != kNegInf ? *sink : kInf;
    return 0.f;
  }
  if (sink == nullptr) {
    lse = m + std::log(l);
    return 1.f / l;
  }
  const float mx = std::max(m, *sink);
  const float z = l * std::exp(m - mx) + std::exp(*sink - mx);
  lse = mx + std::log(z);
  return std::exp(m - mx) / z;
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
      const Row& row = rb.row;
      const int64_t b = row.b, hk = rb.hk, i0 = rb.i0, m = rb.m, rows = rb.nh * m, t = row.t, gi0 = row.off + i0;
      Rows Q{qbuf.data(), D};
      if (rb.nh == 1) {
        Q = block_rows(Qv, b, rb.h0, gi0, m, D, qbuf.data());
      } else {  // the group's heads stacked in qbuf
        for (int64_t g = 0; g < rb.nh; ++g) {
          float* dst = qbuf.data() + g * m * D;
          const Rows src = block_rows(Qv, b, rb.h0 + g, gi0, m, D, dst);
          if (src.p != dst)
            for (int64_t r = 0; r < m; ++r) std::copy(src.p + r * src.ld, src.p + r * src.ld + D, dst + r * D);
        }
      }
      std::fill(mrow.begin(), mrow.end(), kNegInf);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      const CpuProblem::KeyWalk walk = pr.key_walk(row, i0, m);
      const int64_t seq_end = pr.seq_end(row, i0, m);
      for (int64_t blk = 0; blk < walk.count(); ++blk) {
        bool is_prefix;
        int64_t j0, n;
        if (!pr.key_block(row, walk, seq_end, blk, is_prefix, j0, n)) continue;
        const int64_t kj0 = is_prefix ? j0 : row.off + j0;
        const Rows K = block_rows(is_prefix ? PKv : Kv, is_prefix ? t : b, hk, kj0, n, D, kbuf.data());
        const Rows V = block_rows(is_prefix ? PVv : Vv, is_prefix ? t : b, hk, kj0, n, D, vbuf.data());
        float* s = sbuf.data();
        gemm_rm(false, true, rows, n, D, pr.scale, Q.p, Q.ld, K.p, K.ld, 0.f, s, n);
        if (pr.softcap > 0.f) softcap_scores(s, rows * n, pr.softcap, nullptr);
        if (!is_prefix)
          for (int64_t g = 0; g < rb.nh; ++g) mask_seq_tile(s + g * m * n, m, n, i0, j0, row, pr.causal, pr.window);
        softmax_update(s, rows, n, mrow.data(), lrow.data(), alpha.data());
        if (dropout) {
          for (int64_t g = 0; g < rb.nh; ++g)
            dropout_tile(zbuf.data() + g * m * n, m, n, pr.seed, pr.row_offset(b, rb.h0 + g, gi0), pr.P + pr.S,
                         pr.column(row, is_prefix, j0), pr.dropout_p, inv_keep);
          mul_inplace(s, zbuf.data(), rows * n);
        }
        scale_rows(acc.data(), rows, D, alpha.data());
        gemm_rm(false, false, rows, D, n, 1.f, s, n, V.p, V.ld, 1.f, acc.data(), D);
      }
      for (int64_t g = 0; g < rb.nh; ++g) {
        float* ls = lse_p + (b * pr.Hq + rb.h0 + g) * pr.L + gi0;
        for (int64_t r = 0; r < m; ++r) {
          const int64_t x = g * m + r;
          const float inv = finish_row(mrow[x], lrow[x], pr.sink(rb.h0 + g), ls[r]);
          T* o = Ov.at(b, rb.h0 + g, gi0 + r);
          const float* a = acc.data() + x * D;
          if (Ov.s3 == 1) {
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
          } else {
            for (int64_t d = 0; d < D; ++d) o[d * Ov.s3] = static_cast<T>(a[d] * inv);
          }
        }
      }
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------------------

// Per-task scratch of the backward passes.
struct BwdScratch {
  std::vector<float> qbuf, dobuf, kbuf, vbuf, p, dp, z, th;
  BwdScratch(int64_t D, bool dropout, bool softcap)
      : qbuf(kBlockQ * D), dobuf(kBlockQ * D), kbuf(kBlockK * D), vbuf(kBlockK * D), p(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), z(dropout ? kBlockQ * kBlockK : 0), th(softcap ? kBlockQ * kBlockK : 0) {}
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
        inv_keep(dropout ? 1.f / (1.f - pr.dropout_p) : 1.f), softcap(pr.softcap > 0.f),
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

  // One tile: query rows [i0, i0 + m) of `row`, head h, against keys [j0, j0 + n) of the prefix or the
  // sequence. Leaves P in sc.p, dS (of the scaled scores, before any soft-cap) in sc.dp and, with dropout and
  // need_pz, the dropped probabilities P * Z in sc.z (only dV reads them).
  void tile(BwdScratch& sc, Rows Q, Rows dO, Rows K, Rows V, int64_t m, int64_t n, const Row& row, int64_t h,
            int64_t i0, int64_t j0, bool is_prefix, bool need_pz) const {
    const int64_t D = pr.D, row0 = (row.b * pr.Hq + h) * pr.L + row.off + i0;
    float* p = sc.p.data();
    float* dp = sc.dp.data();
    gemm_rm(false, true, m, n, D, pr.scale, Q.p, Q.ld, K.p, K.ld, 0.f, p, n);
    if (softcap) softcap_scores(p, m * n, pr.softcap, sc.th.data());
    if (!is_prefix) mask_seq_tile(p, m, n, i0, j0, row, pr.causal, pr.window);
    probs_from_lse(p, m, n, lse_p + row0);
    gemm_rm(false, true, m, n, D, 1.f, dO.p, dO.ld, V.p, V.ld, 0.f, dp, n);
    if (dropout) {
      float* z = sc.z.data();
      dropout_tile(z, m, n, pr.seed, pr.row_offset(row.b, h, row.off + i0), pr.P + pr.S,
                   pr.column(row, is_prefix, j0), pr.dropout_p, inv_keep);
      mul_inplace(dp, z, m * n);
      if (need_pz) mul_inplace(z, p, m * n);
    }
    softmax_grad(p, dp, m, n, delta_p + row0);
    if (softcap) softcap_grad(dp, sc.th.data(), m * n);
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

  // Prefix key block pb of `row`, KV head hk, against every (query block, head of the group) in a fixed order:
  // with want.dprefix its dk/dv into chunk c's partial sums; with dq_rows ([group, L, D] fp32 of the batch
  // row) the prefix part of dq.
  void prefix_block(BwdScratch& sc, int64_t c, const Row& row, int64_t hk, int64_t pb, float* dq_rows) const {
    const int64_t D = pr.D, j0 = pb * kBlockK, n = std::min(kBlockK, pr.P - j0), b = row.b;
    const Rows K = block_rows(PKv, row.t, hk, j0, n, D, sc.kbuf.data());
    const Rows V = block_rows(PVv, row.t, hk, j0, n, D, sc.vbuf.data());
    const int64_t part0 = c * per_chunk + ((row.t * pr.Hkv + hk) * pr.P + j0) * D;
    for (int64_t qb = 0; qb < row.query_blocks(); ++qb) {
      const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, row.L - i0), gi0 = row.off + i0;
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        const Rows Q = block_rows(Qv, b, h, gi0, m, D, sc.qbuf.data());
        const Rows dO = block_rows(dOv, b, h, gi0, m, D, sc.dobuf.data());
        tile(sc, Q, dO, K, V, m, n, row, h, i0, j0, true, want.dprefix);
        if (want.dprefix) add_dkdv(sc, Q, dO, m, n, part_k_p + part0, part_v_p + part0);
        if (dq_rows != nullptr) add_dq(sc, K, m, n, dq_rows + ((h - hk * pr.group) * pr.L + gi0) * D);
      }
    }
  }

  // Sequence key block kb of `row`, KV head hk, against the query blocks that may see it: with want.dkdv its
  // dk/dv, written out; with dq_rows also its part of dq (for the query blocks bwd_dq would visit, so the sums
  // match it bit for bit).
  void seq_block(BwdScratch& sc, float* dkacc, float* dvacc, const Row& row, int64_t hk, int64_t kb,
                 float* dq_rows) const {
    const int64_t D = pr.D, j0 = kb * kBlockK, n = std::min(kBlockK, row.S - j0), b = row.b, gj0 = row.off + j0;
    if (want.dkdv) {
      std::fill(dkacc, dkacc + n * D, 0.f);
      std::fill(dvacc, dvacc + n * D, 0.f);
    }
    const int64_t i_begin = pr.query_begin(row, j0), i_end = pr.query_end(row, j0, n);
    if (!all_padded(row.kpm, j0, n) && i_begin < i_end) {
      const Rows K = block_rows(Kv, b, hk, gj0, n, D, sc.kbuf.data());
      const Rows V = block_rows(Vv, b, hk, gj0, n, D, sc.vbuf.data());
      for (int64_t h = hk * pr.group; h < (hk + 1) * pr.group; ++h) {
        for (int64_t qb = i_begin / kBlockQ; qb * kBlockQ < i_end; ++qb) {
          const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, row.L - i0), gi0 = row.off + i0;
          const bool dq_here = dq_rows != nullptr && j0 < pr.seq_end(row, i0, m) && j0 + n > pr.seq_begin(row, i0);
          if (!want.dkdv && !dq_here) continue;
          const Rows Q = block_rows(Qv, b, h, gi0, m, D, sc.qbuf.data());
          const Rows dO = block_rows(dOv, b, h, gi0, m, D, sc.dobuf.data());
          tile(sc, Q, dO, K, V, m, n, row, h, i0, j0, false, want.dkdv);
          if (want.dkdv) add_dkdv(sc, Q, dO, m, n, dkacc, dvacc);
          if (dq_here) add_dq(sc, K, m, n, dq_rows + ((h - hk * pr.group) * pr.L + gi0) * D);
        }
      }
    }
    if (want.dkdv) {
      dKv.store(b, hk, gj0, dkacc, n, D);
      dVv.store(b, hk, gj0, dvacc, n, D);
    }
  }

  // One task per (chunk of batch rows, kv head): every key block of each row, prefix then sequence.
  void bwd_fused() {
    const int64_t D = pr.D, L = pr.L;
    at::parallel_for(0, nchunks * pr.Hkv, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout, softcap);
      std::vector<float> dkacc(want.dkdv ? kBlockK * D : 0), dvacc(want.dkdv ? kBlockK * D : 0),
          dq_buf(want.dq ? pr.group * L * D : 0);
      float* dq_rows = want.dq ? dq_buf.data() : nullptr;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t hk = task % pr.Hkv, c = task / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b) {
          if (dq_rows != nullptr) std::fill(dq_buf.begin(), dq_buf.end(), 0.f);
          for (int64_t r = 0; r < pr.rows_in(b); ++r) {
            const Row row = pr.row(b, r);
            if (dq_rows != nullptr || want.dprefix)
              for (int64_t pb = 0; pb < npb; ++pb) prefix_block(sc, c, row, hk, pb, dq_rows);
            if (dq_rows != nullptr || want.dkdv)
              for (int64_t kb = 0; kb < row.key_blocks(); ++kb)
                seq_block(sc, dkacc.data(), dvacc.data(), row, hk, kb, dq_rows);
          }
          if (dq_rows != nullptr)
            for (int64_t g = 0; g < pr.group; ++g) dQv.store(b, hk * pr.group + g, 0, dq_rows + g * L * D, L, D);
        }
      }
    });
  }

  // dq per (b, h, query block): the walk of the forward, key block by key block.
  void bwd_dq() {
    const int64_t D = pr.D;
    at::parallel_for(0, pr.B * pr.Hq * pr.nqb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(D, dropout, softcap);
      std::vector<float> dqacc(kBlockQ * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / pr.nqb, h = bh % pr.Hq, b = bh / pr.Hq, hk = h / pr.group;
        int64_t qb;
        const Row row = pr.row_of_block(b, task % pr.nqb, qb);
        const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, row.L - i0), gi0 = row.off + i0;
        const Rows Q = block_rows(Qv, b, h, gi0, m, D, sc.qbuf.data());
        const Rows dO = block_rows(dOv, b, h, gi0, m, D, sc.dobuf.data());
        std::fill(dqacc.begin(), dqacc.begin() + m * D, 0.f);
        const CpuProblem::KeyWalk walk = pr.key_walk(row, i0, m);
        for (int64_t blk = 0; blk < walk.count(); ++blk) {
          bool is_prefix;
          int64_t j0, n;
          // The blocks of the forward's walk, but each sequence block whole (end S, not seq_end; the keys
          // past seq_end are masked), as seq_block computes it: gemm_rm rounds a column in its vector body
          // and in its scalar tail differently, so only tiles of the fused pass's widths give its dq bit
          // for bit.
          if (!pr.key_block(row, walk, row.S, blk, is_prefix, j0, n)) continue;
          const int64_t kj0 = is_prefix ? j0 : row.off + j0;
          const Rows K = block_rows(is_prefix ? PKv : Kv, is_prefix ? row.t : b, hk, kj0, n, D, sc.kbuf.data());
          const Rows V = block_rows(is_prefix ? PVv : Vv, is_prefix ? row.t : b, hk, kj0, n, D, sc.vbuf.data());
          tile(sc, Q, dO, K, V, m, n, row, h, i0, j0, is_prefix, false);
          add_dq(sc, K, m, n, dqacc.data());
        }
        dQv.store(b, h, gi0, dqacc.data(), m, D);
      }
    });
  }

  // Sequence dk, dv per (b, kv head, key block).
  void bwd_dkdv() {
    at::parallel_for(0, pr.B * pr.Hkv * pr.nkb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(pr.D, dropout, softcap);
      std::vector<float> dkacc(kBlockK * pr.D), dvacc(kBlockK * pr.D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bhk = task / pr.nkb;
        int64_t kb;
        const Row row = pr.row_of_block(bhk / pr.Hkv, task % pr.nkb, kb);
        seq_block(sc, dkacc.data(), dvacc.data(), row, bhk % pr.Hkv, kb, nullptr);
      }
    });
  }

  // Prefix dk, dv partial sums per (chunk, kv head, prefix key block).
  void bwd_dprefix() {
    at::parallel_for(0, nchunks * pr.Hkv * npb, 1, [&](int64_t begin, int64_t end) {
      BwdScratch sc(pr.D, dropout, softcap);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t pb = task % npb, rest = task / npb, hk = rest % pr.Hkv, c = rest / pr.Hkv;
        for (int64_t b = first_row(c); b < first_row(c + 1); ++b)
          for (int64_t r = 0; r < pr.rows_in(b); ++r) prefix_block(sc, c, pr.row(b, r), hk, pb, nullptr);
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
  const bool softcap;
  const int64_t npb;
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

// The inputs shared by fwd and bwd, checked, as the problem of the block walks.
CpuProblem checked_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                           const at::Tensor& prefix_v, const std::optional<at::Tensor>& key_padding_mask,
                           const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& cu_seqlens,
                           const std::optional<at::Tensor>& sinks, bool causal, int64_t window, double softcap,
                           double scale, double dropout_p, int64_t seed, Held& held) {
  const Problem base = check_inputs(at::kCPU, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal,
                                    scale, dropout_p, seed, cu_seqlens);
  check_features(base, q, key_padding_mask, cu_seqlens, sinks, window, softcap);
  return cpu_problem(base, key_padding_mask, prefix_index, cu_seqlens, sinks, window, softcap, held);
}

// `deterministic` is part of every backend's schema; the CPU kernels are always deterministic.
std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                       const std::optional<at::Tensor>& key_padding_mask,
                                       const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& sinks, bool causal, int64_t window, double softcap, double scale,
                                       double dropout_p, int64_t seed, bool /*deterministic*/) {
  Held held;
  const CpuProblem pr = checked_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens,
                                        sinks, causal, window, softcap, scale, dropout_p, seed, held);
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
  Held held;
  const CpuProblem pr = checked_problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens,
                                        sinks, causal, window, softcap, scale, dropout_p, seed, held);
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
