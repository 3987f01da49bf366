// CUDA fallback kernels of the prefix_kernels ops (the op contract: docs/op.md), FlashAttention-2 style.
//
// Keys of query row i are the P prefix keys (never masked) followed by the S sequence keys (key padding,
// causal bottom-right). Every kernel works on shared-memory tiles with 128 threads:
//   * the two tile products it needs, C = A B^T and C += A B, run on tensor cores (nvcuda::wmma
//     m16n16k16, fp32 accumulation) for fp16/bf16 and as plain fp32 loops for fp32 inputs;
//   * accumulators (O, dQ, dK, dV) live in fp32 shared memory, so registers stay low at every head dim
//     (D is a runtime value, padded with zeros to DP = a multiple of 16 in shared memory).
// prefix_attention_fwd: one block per (query block, b * Hq + h): online softmax over the prefix key blocks
// then the visible sequence key blocks. Backward:
//   prefix_attention_bwd_preprocess   delta = rowsum(dO * O)
//   prefix_attention_bwd_dq           per query block
//   prefix_attention_bwd_dkdv         sequence dK/dV per (key block, b, kv head), looping over the group's
//                                     query heads and visible query blocks
//   prefix_attention_bwd_dprefix      prefix dK/dV per (prefix key block, t, kv head, chunk) into fp32
//                                     partial sums, a chunk being a fixed slice of the (b, head, query block)
//                                     work list
//   prefix_attention_bwd_dprefix_reduce   the chunks added in a fixed order
// No atomics: results are bitwise repeatable. A gradient that is not wanted skips the kernels of its own.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../philox.h"  // the dropout RNG shared with the CPU kernels (Triton-identical Philox)
#include "prefix_attention_kernels.cuh"

namespace prefix_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------------
// element types

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> constexpr bool kTensorCore = !std::is_same<T, float>::value;

// Leading dimensions (in elements) of shared-memory tiles with n columns. wmma needs multiples of 8
// (16-bit inputs) and 4 (fp32 accumulators); the +8 / +4 / +1 padding spreads rows over the banks.
template <typename T> __host__ __device__ __forceinline__ int ld_in(int n) { return kTensorCore<T> ? n + 8 : n + 1; }
template <typename T> __host__ __device__ __forceinline__ int ld_acc(int n) { return kTensorCore<T> ? n + 4 : n + 1; }

// Carves one buffer out of dynamic shared memory (128-byte aligned, as wmma needs 32). With base == null
// it only counts bytes: the host computes the launch's shared memory with the very same code.
template <typename U>
__host__ __device__ __forceinline__ U* take(unsigned char* base, size_t& off, size_t n) {
  off = (off + 127) & ~static_cast<size_t>(127);
  U* ptr = base ? reinterpret_cast<U*>(base + off) : nullptr;
  off += n * sizeof(U);
  return ptr;
}

// ---------------------------------------------------------------------------------------------------
// block-level tile products (all 128 threads call them; no barrier inside)

// C[M][N] (fp32) = A[M][K] * B[N][K]^T, K a multiple of 16.
template <typename T, int M, int N>
__device__ __forceinline__ void mm_abT(float* C, int ldc, const T* A, int lda, const T* Bm, int ldb, int K) {
  if constexpr (kTensorCore<T>) {
    using namespace nvcuda;
    static_assert(M % 16 == 0 && N % 16 == 0, "tile sizes must be multiples of 16");
    const int warp = threadIdx.x / 32;
    constexpr int tn = N / 16, tiles = (M / 16) * tn;
    for (int t = warp; t < tiles; t += kWarps) {
      const int mi = t / tn, ni = t % tn;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, A + mi * 16 * lda + kk, lda);
        wmma::load_matrix_sync(b, Bm + ni * 16 * ldb + kk, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + mi * 16 * ldc + ni * 16, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int r = idx / N, c = idx % N;
      const T* a = A + r * lda;
      const T* b = Bm + c * ldb;
      float acc = 0.f;
      for (int kk = 0; kk < K; ++kk) acc = fmaf(a[kk], b[kk], acc);
      C[r * ldc + c] = acc;
    }
  }
}

// C[M][N] (fp32) += A[M][K] * B[K][N]; N a runtime multiple of 16 (the padded head dim).
template <typename T, int M, int K>
__device__ __forceinline__ void mm_ab_acc(float* C, int ldc, const T* A, int lda, const T* Bm, int ldb, int N) {
  if constexpr (kTensorCore<T>) {
    using namespace nvcuda;
    static_assert(M % 16 == 0 && K % 16 == 0, "tile sizes must be multiples of 16");
    const int warp = threadIdx.x / 32;
    const int tn = N / 16, tiles = (M / 16) * tn;
    for (int t = warp; t < tiles; t += kWarps) {
      const int mi = t / tn, ni = t % tn;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* c = C + mi * 16 * ldc + ni * 16;
      wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, A + mi * 16 * lda + kk, lda);
        wmma::load_matrix_sync(b, Bm + kk * ldb + ni * 16, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int r = idx / N, c = idx % N;
      const T* a = A + r * lda;
      float acc = C[r * ldc + c];
#pragma unroll
      for (int kk = 0; kk < K; ++kk) acc = fmaf(a[kk], Bm[kk * ldb + c], acc);
      C[r * ldc + c] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// tile loads and helpers

// dst[r][d] = src[r * D + d] for r < nvalid and d < D, zero elsewhere (r < rows, d < DP).
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int nvalid, int rows, int D, int DP) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T zero = Cvt<T>::from(0.f);
  for (int r = warp; r < rows; r += kWarps) {
    const bool valid = r < nvalid;
    const T* s = src + static_cast<size_t>(valid ? r : 0) * D;
    for (int d = lane; d < DP; d += 32) dst[r * ld + d] = (valid && d < D) ? s[d] : zero;
  }
}

__device__ __forceinline__ void zero_floats(float* dst, int n) {
  for (int idx = threadIdx.x; idx < n; idx += kThreads) dst[idx] = 0.f;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Sequence key j visible to query i (both in range)?
__device__ __forceinline__ bool seq_visible(const Params& p, int b, int i, int j) {
  if (p.causal && j > i + (p.S - p.L)) return false;
  if (p.kpm != nullptr && !p.kpm[static_cast<size_t>(b) * p.S + j]) return false;
  return true;
}

// Dropout multiplier of key column c (prefix first) of query row i of (b, h): 0 or 1 / (1 - p).
__device__ __forceinline__ float dropout_factor(const Params& p, int b, int h, int i, int c, float keep_scale) {
  const uint64_t row = (static_cast<uint64_t>(b) * p.Hq + h) * static_cast<uint64_t>(p.L) + i;
  const uint64_t offset = row * static_cast<uint64_t>(p.P + p.S) + static_cast<uint64_t>(c);
  return prefix_kernels::dropout_keep(p.seed, offset, p.dropout_p) ? keep_scale : 0.f;
}

// Number of sequence keys that some query of [i0, i0 + nrows) may see (all S unless causal).
__device__ __forceinline__ int seq_keys_needed(const Params& p, int i0, int nrows) {
  if (!p.causal) return p.S;
  const int last = i0 + nrows - 1 + (p.S - p.L);  // last visible key of the last row
  return max(0, min(p.S, last + 1));
}

// ---------------------------------------------------------------------------------------------------
// forward

template <typename T, int BM, int BN>
struct FwdSmem {
  T* q; T* kv; float* s; T* pr; float* o; float* m; float* l;
  size_t bytes;
  __host__ __device__ FwdSmem(unsigned char* base, int DP) {
    size_t off = 0;
    q = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(DP));
    kv = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(DP));
    s = take<float>(base, off, static_cast<size_t>(BM) * ld_acc<T>(BN));
    pr = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(BN));
    o = take<float>(base, off, static_cast<size_t>(BM) * ld_acc<T>(DP));
    m = take<float>(base, off, BM);
    l = take<float>(base, off, BM);
    bytes = off;
  }
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_fwd(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int DP = p.DP, D = p.D;
  FwdSmem<T, BM, BN> sm(smem, DP);
  const int ldq = ld_in<T>(DP), lds = ld_acc<T>(BN), ldp = ld_in<T>(BN), ldo = ld_acc<T>(DP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int nqb = cdiv(p.L, BM);
  const int qb = blockIdx.x % nqb;
  const int bh = blockIdx.x / nqb;  // b * Hq + h
  const int b = bh / p.Hq, h = bh % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int t = p.pidx ? static_cast<int>(p.pidx[b]) : 0;
  const int i0 = qb * BM;
  const int nrows = min(BM, p.L - i0);

  const T* qg = static_cast<const T*>(p.q) + (static_cast<size_t>(bh) * p.L + i0) * D;
  const T* kg = static_cast<const T*>(p.k) + static_cast<size_t>(b * p.Hkv + hk) * p.S * D;
  const T* vg = static_cast<const T*>(p.v) + static_cast<size_t>(b * p.Hkv + hk) * p.S * D;
  const T* pkg = static_cast<const T*>(p.pk) + static_cast<size_t>(t * p.Hkv + hk) * p.P * D;
  const T* pvg = static_cast<const T*>(p.pv) + static_cast<size_t>(t * p.Hkv + hk) * p.P * D;

  load_rows<T>(sm.q, ldq, qg, nrows, BM, D, DP);
  zero_floats(sm.o, BM * ldo);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    sm.m[r] = -INFINITY;
    sm.l[r] = 0.f;
  }

  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const int npb = cdiv(p.P, BN);
  const int nsb = cdiv(seq_keys_needed(p, i0, nrows), BN);

  for (int kb = 0; kb < npb + nsb; ++kb) {
    const bool is_prefix = kb < npb;
    const int j0 = (is_prefix ? kb : kb - npb) * BN;
    const int nkeys = is_prefix ? min(BN, p.P - j0) : min(BN, p.S - j0);
    load_rows<T>(sm.kv, ldq, (is_prefix ? pkg : kg) + static_cast<size_t>(j0) * D, nkeys, BN, D, DP);
    __syncthreads();  // K tile (and, first time, Q / O / stats) ready
    mm_abT<T, BM, BN>(sm.s, lds, sm.q, ldq, sm.kv, ldq, DP);
    __syncthreads();  // scores ready, K tile free

    // online softmax: warp w owns rows w, w + kWarps, ...
    for (int r = warp; r < BM; r += kWarps) {
      const int i = i0 + r;
      const bool row_ok = r < nrows;
      float mx = -INFINITY;
      for (int c = lane; c < BN; c += 32) {
        const int j = j0 + c;
        bool vis = row_ok && c < nkeys;
        if (vis && !is_prefix) vis = seq_visible(p, b, i, j);
        const float s = vis ? sm.s[r * lds + c] * p.scale : -INFINITY;
        sm.s[r * lds + c] = s;
        mx = fmaxf(mx, s);
      }
      mx = warp_max(mx);
      const float m_old = sm.m[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: every p is 0
      float sum = 0.f;
      for (int c = lane; c < BN; c += 32) {
        float pr = __expf(sm.s[r * lds + c] - m_use);
        sum += pr;
        if (dropout && pr != 0.f) {
          const int col = is_prefix ? j0 + c : p.P + j0 + c;
          pr *= dropout_factor(p, b, h, i, col, keep_scale);
        }
        sm.pr[r * ldp + c] = Cvt<T>::from(pr);
      }
      sum = warp_sum(sum);
      const float alpha = __expf(m_old - m_use);  // 0 while m_old = -inf
      for (int d = lane; d < DP; d += 32) sm.o[r * ldo + d] *= alpha;
      if (lane == 0) {
        sm.m[r] = m_new;
        sm.l[r] = sm.l[r] * alpha + sum;
      }
    }
    const T* vsrc = (is_prefix ? pvg : vg) + static_cast<size_t>(j0) * D;
    load_rows<T>(sm.kv, ldq, vsrc, nkeys, BN, D, DP);
    __syncthreads();  // P, rescaled O and V tile ready
    mm_ab_acc<T, BM, BN>(sm.o, ldo, sm.pr, ldp, sm.kv, ldq, DP);
    __syncthreads();  // O updated, V tile and P free
  }
  __syncthreads();  // needed when there was no key block at all (rows with no visible key)

  T* og = static_cast<T*>(p.out) + (static_cast<size_t>(bh) * p.L + i0) * D;
  for (int r = warp; r < nrows; r += kWarps) {
    const float l = sm.l[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = lane; d < D; d += 32) og[static_cast<size_t>(r) * D + d] = Cvt<T>::from(sm.o[r * ldo + d] * inv);
    if (lane == 0) p.lse[static_cast<size_t>(bh) * p.L + i0 + r] = l > 0.f ? sm.m[r] + logf(l) : INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------------
// backward: delta = rowsum(dO * O) in fp32, one warp per row

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_bwd_preprocess(const Params p) {
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.L;
  const size_t row = static_cast<size_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  const T* g = static_cast<const T*>(p.dout) + row * p.D;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc = fmaf(Cvt<T>::to(o[d]), Cvt<T>::to(g[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

// ---------------------------------------------------------------------------------------------------
// backward: dQ = scale * sum over key blocks of dS K, one block per (query block, b * Hq + h)

template <typename T, int BM, int BN>
struct DqSmem {
  T* q; T* dout; T* k; T* v; float* s; float* dp; T* ds; float* dq; float* lse; float* delta;
  size_t bytes;
  __host__ __device__ DqSmem(unsigned char* base, int DP) {
    size_t off = 0;
    q = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(DP));
    dout = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(DP));
    k = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(DP));
    v = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(DP));
    s = take<float>(base, off, static_cast<size_t>(BM) * ld_acc<T>(BN));
    dp = take<float>(base, off, static_cast<size_t>(BM) * ld_acc<T>(BN));
    ds = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(BN));
    dq = take<float>(base, off, static_cast<size_t>(BM) * ld_acc<T>(DP));
    lse = take<float>(base, off, BM);
    delta = take<float>(base, off, BM);
    bytes = off;
  }
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_bwd_dq(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int DP = p.DP, D = p.D;
  DqSmem<T, BM, BN> sm(smem, DP);
  const int ldq = ld_in<T>(DP), lds = ld_acc<T>(BN), ldp = ld_in<T>(BN), ldo = ld_acc<T>(DP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int nqb = cdiv(p.L, BM);
  const int qb = blockIdx.x % nqb;
  const int bh = blockIdx.x / nqb;
  const int b = bh / p.Hq, h = bh % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const int t = p.pidx ? static_cast<int>(p.pidx[b]) : 0;
  const int i0 = qb * BM;
  const int nrows = min(BM, p.L - i0);
  const size_t row0 = static_cast<size_t>(bh) * p.L + i0;

  const T* kg = static_cast<const T*>(p.k) + static_cast<size_t>(b * p.Hkv + hk) * p.S * D;
  const T* vg = static_cast<const T*>(p.v) + static_cast<size_t>(b * p.Hkv + hk) * p.S * D;
  const T* pkg = static_cast<const T*>(p.pk) + static_cast<size_t>(t * p.Hkv + hk) * p.P * D;
  const T* pvg = static_cast<const T*>(p.pv) + static_cast<size_t>(t * p.Hkv + hk) * p.P * D;

  load_rows<T>(sm.q, ldq, static_cast<const T*>(p.q) + row0 * D, nrows, BM, D, DP);
  load_rows<T>(sm.dout, ldq, static_cast<const T*>(p.dout) + row0 * D, nrows, BM, D, DP);
  zero_floats(sm.dq, BM * ldo);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    sm.lse[r] = r < nrows ? p.lse[row0 + r] : INFINITY;
    sm.delta[r] = r < nrows ? p.delta[row0 + r] : 0.f;
  }

  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  const int npb = cdiv(p.P, BN);
  const int nsb = cdiv(seq_keys_needed(p, i0, nrows), BN);

  for (int kb = 0; kb < npb + nsb; ++kb) {
    const bool is_prefix = kb < npb;
    const int j0 = (is_prefix ? kb : kb - npb) * BN;
    const int nkeys = is_prefix ? min(BN, p.P - j0) : min(BN, p.S - j0);
    load_rows<T>(sm.k, ldq, (is_prefix ? pkg : kg) + static_cast<size_t>(j0) * D, nkeys, BN, D, DP);
    load_rows<T>(sm.v, ldq, (is_prefix ? pvg : vg) + static_cast<size_t>(j0) * D, nkeys, BN, D, DP);
    __syncthreads();  // K, V (and, first time, Q, dO, dQ, lse, delta) ready
    mm_abT<T, BM, BN>(sm.s, lds, sm.q, ldq, sm.k, ldq, DP);
    mm_abT<T, BM, BN>(sm.dp, lds, sm.dout, ldq, sm.v, ldq, DP);
    __syncthreads();  // S and dO V^T ready
    for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
      const int r = idx / BN, c = idx % BN;
      const int i = i0 + r, j = j0 + c;
      bool vis = r < nrows && c < nkeys;
      if (vis && !is_prefix) vis = seq_visible(p, b, i, j);
      float ds = 0.f;
      if (vis) {
        const float pr = __expf(sm.s[r * lds + c] * p.scale - sm.lse[r]);
        float dpv = sm.dp[r * lds + c];
        if (dropout) dpv *= dropout_factor(p, b, h, i, is_prefix ? j : p.P + j, keep_scale);
        ds = pr * (dpv - sm.delta[r]);
      }
      sm.ds[r * ldp + c] = Cvt<T>::from(ds);
    }
    __syncthreads();  // dS ready
    mm_ab_acc<T, BM, BN>(sm.dq, ldo, sm.ds, ldp, sm.k, ldq, DP);
    __syncthreads();  // dQ updated; K, V, dS free
  }
  __syncthreads();  // needed when there was no key block at all

  T* dqg = static_cast<T*>(p.dq) + row0 * D;
  for (int r = warp; r < nrows; r += kWarps)
    for (int d = lane; d < D; d += 32) dqg[static_cast<size_t>(r) * D + d] = Cvt<T>::from(sm.dq[r * ldo + d] * p.scale);
}

// ---------------------------------------------------------------------------------------------------
// backward: dK, dV of one key block (BN keys) accumulated over query blocks (BM queries each).
// Shared by prefix_attention_bwd_dkdv (one block per sequence key block, b, kv head: writes dk, dv) and
// prefix_attention_bwd_dprefix (one block per prefix key block, t, kv head, chunk: writes fp32 partial sums).

template <typename T, int BN, int BM>
struct DkdvSmem {
  T* k; T* v; T* q; T* dout; float* s; float* dp; T* pr; T* ds; float* dk; float* dv; float* lse; float* delta;
  size_t bytes;
  __host__ __device__ DkdvSmem(unsigned char* base, int DP) {
    size_t off = 0;
    k = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(DP));
    v = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(DP));
    q = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(DP));
    dout = take<T>(base, off, static_cast<size_t>(BM) * ld_in<T>(DP));
    s = take<float>(base, off, static_cast<size_t>(BN) * ld_acc<T>(BM));
    dp = take<float>(base, off, static_cast<size_t>(BN) * ld_acc<T>(BM));
    pr = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(BM));
    ds = take<T>(base, off, static_cast<size_t>(BN) * ld_in<T>(BM));
    dk = take<float>(base, off, static_cast<size_t>(BN) * ld_acc<T>(DP));
    dv = take<float>(base, off, static_cast<size_t>(BN) * ld_acc<T>(DP));
    lse = take<float>(base, off, BM);
    delta = take<float>(base, off, BM);
    bytes = off;
  }
};

// Adds the contribution of query rows [i0, i0 + BM) of (b, h) to the key block held in sm.k / sm.v.
// Key j0 + r is column `col0 + r` of the P + S keys; IS_PREFIX: never masked, else key padding + causal.
template <typename T, int BN, int BM, bool IS_PREFIX>
__device__ __forceinline__ void dkdv_accumulate(const Params& p, DkdvSmem<T, BN, BM>& sm, int b, int h, int i0,
                                                int j0, int nkeys, int col0, float keep_scale) {
  const int DP = p.DP, D = p.D;
  const int ldq = ld_in<T>(DP), lds = ld_acc<T>(BM), ldp = ld_in<T>(BM), ldo = ld_acc<T>(DP);
  const int nrows = min(BM, p.L - i0);
  const size_t row0 = static_cast<size_t>(b * p.Hq + h) * p.L + i0;
  load_rows<T>(sm.q, ldq, static_cast<const T*>(p.q) + row0 * D, nrows, BM, D, DP);
  load_rows<T>(sm.dout, ldq, static_cast<const T*>(p.dout) + row0 * D, nrows, BM, D, DP);
  for (int c = threadIdx.x; c < BM; c += kThreads) {
    sm.lse[c] = c < nrows ? p.lse[row0 + c] : INFINITY;
    sm.delta[c] = c < nrows ? p.delta[row0 + c] : 0.f;
  }
  __syncthreads();  // Q, dO, lse, delta ready (and the previous step's products done)
  mm_abT<T, BN, BM>(sm.s, lds, sm.k, ldq, sm.q, ldq, DP);      // S^T  = K Q^T
  mm_abT<T, BN, BM>(sm.dp, lds, sm.v, ldq, sm.dout, ldq, DP);  // dP^T = V dO^T (before dropout)
  __syncthreads();
  const bool dropout = p.dropout_p > 0.f;
  for (int idx = threadIdx.x; idx < BN * BM; idx += kThreads) {
    const int r = idx / BM, c = idx % BM;  // key r, query c
    const int j = j0 + r, i = i0 + c;
    bool vis = r < nkeys && c < nrows;
    if (!IS_PREFIX && vis) vis = seq_visible(p, b, i, j);
    float pd = 0.f, ds = 0.f;
    if (vis) {
      const float pr = __expf(sm.s[r * lds + c] * p.scale - sm.lse[c]);
      const float z = dropout ? dropout_factor(p, b, h, i, col0 + r, keep_scale) : 1.f;
      pd = pr * z;
      ds = pr * (sm.dp[r * lds + c] * z - sm.delta[c]);
    }
    sm.pr[r * ldp + c] = Cvt<T>::from(pd);
    sm.ds[r * ldp + c] = Cvt<T>::from(ds);
  }
  __syncthreads();
  mm_ab_acc<T, BN, BM>(sm.dv, ldo, sm.pr, ldp, sm.dout, ldq, DP);  // dV += (P o Z)^T dO
  mm_ab_acc<T, BN, BM>(sm.dk, ldo, sm.ds, ldp, sm.q, ldq, DP);     // dK += dS^T Q (times scale at the end)
  __syncthreads();  // Q, dO, P, dS free for the next step
}

template <typename T, int BN, int BM>
__device__ __forceinline__ void dkdv_init(const Params& p, DkdvSmem<T, BN, BM>& sm, const T* kg, const T* vg,
                                          int nkeys) {
  const int DP = p.DP, ldq = ld_in<T>(DP), ldo = ld_acc<T>(DP);
  load_rows<T>(sm.k, ldq, kg, nkeys, BN, p.D, DP);
  load_rows<T>(sm.v, ldq, vg, nkeys, BN, p.D, DP);
  zero_floats(sm.dk, BN * ldo);
  zero_floats(sm.dv, BN * ldo);
  // the first dkdv_accumulate starts with a barrier
}

template <typename T, int BN, int BM>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_bwd_dkdv(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int DP = p.DP, D = p.D;
  DkdvSmem<T, BN, BM> sm(smem, DP);
  const int ldo = ld_acc<T>(DP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int nkb = cdiv(p.S, BN);
  const int kb = blockIdx.x % nkb;
  const int bk = blockIdx.x / nkb;  // b * Hkv + hk
  const int b = bk / p.Hkv, hk = bk % p.Hkv;
  const int group = p.Hq / p.Hkv;
  const int j0 = kb * BN;
  const int nkeys = min(BN, p.S - j0);
  const size_t key0 = static_cast<size_t>(bk) * p.S + j0;

  dkdv_init<T, BN, BM>(p, sm, static_cast<const T*>(p.k) + key0 * D, static_cast<const T*>(p.v) + key0 * D, nkeys);
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  // causal: query i sees key j iff i >= j - (S - L); the first key of the block bounds the first query
  const int i_first = p.causal ? max(0, j0 - (p.S - p.L)) : 0;
  const int nqb = cdiv(p.L, BM);
  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    for (int qb = i_first / BM; qb < nqb; ++qb)
      dkdv_accumulate<T, BN, BM, false>(p, sm, b, h, qb * BM, j0, nkeys, p.P + j0, keep_scale);
  }
  __syncthreads();  // needed when no query block ran (dK/dV zeroed by other threads)

  T* dkg = static_cast<T*>(p.dk) + key0 * D;
  T* dvg = static_cast<T*>(p.dv) + key0 * D;
  for (int r = warp; r < nkeys; r += kWarps)
    for (int d = lane; d < D; d += 32) {
      dkg[static_cast<size_t>(r) * D + d] = Cvt<T>::from(sm.dk[r * ldo + d] * p.scale);
      dvg[static_cast<size_t>(r) * D + d] = Cvt<T>::from(sm.dv[r * ldo + d]);
    }
}

template <typename T, int BN, int BM>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_bwd_dprefix(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int DP = p.DP, D = p.D;
  DkdvSmem<T, BN, BM> sm(smem, DP);
  const int ldo = ld_acc<T>(DP);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int npb = cdiv(p.P, BN);
  int x = blockIdx.x;
  const int pb = x % npb; x /= npb;
  const int hk = x % p.Hkv; x /= p.Hkv;
  const int t = x % p.T; x /= p.T;
  const int chunk = x;  // < nchunks
  const int group = p.Hq / p.Hkv;
  const int j0 = pb * BN;
  const int nkeys = min(BN, p.P - j0);
  const size_t key0 = static_cast<size_t>(t * p.Hkv + hk) * p.P + j0;

  dkdv_init<T, BN, BM>(p, sm, static_cast<const T*>(p.pk) + key0 * D, static_cast<const T*>(p.pv) + key0 * D, nkeys);
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;

  // work list: (b, g, qb) flattened; chunk c takes the slice [c * W / n, (c + 1) * W / n)
  const int nqb = cdiv(p.L, BM);
  const int64_t work = static_cast<int64_t>(p.B) * group * nqb;
  const int64_t w_begin = work * chunk / p.nchunks;
  const int64_t w_end = work * (chunk + 1) / p.nchunks;
  for (int64_t w = w_begin; w < w_end; ++w) {
    const int qb = static_cast<int>(w % nqb);
    const int g = static_cast<int>((w / nqb) % group);
    const int b = static_cast<int>(w / (static_cast<int64_t>(nqb) * group));
    if (p.pidx != nullptr && p.pidx[b] != t) continue;  // uniform over the block
    dkdv_accumulate<T, BN, BM, true>(p, sm, b, hk * group + g, qb * BM, j0, nkeys, j0, keep_scale);
  }
  __syncthreads();

  const size_t part0 = (static_cast<size_t>(chunk) * p.T * p.Hkv * p.P + key0) * D;
  for (int r = warp; r < nkeys; r += kWarps)
    for (int d = lane; d < D; d += 32) {
      p.dpk_part[part0 + static_cast<size_t>(r) * D + d] = sm.dk[r * ldo + d] * p.scale;
      p.dpv_part[part0 + static_cast<size_t>(r) * D + d] = sm.dv[r * ldo + d];
    }
}

// dprefix = sum over chunks (fixed order) of the fp32 partials, cast to the input dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefix_attention_bwd_dprefix_reduce(const Params p) {
  const size_t n = static_cast<size_t>(p.T) * p.Hkv * p.P * p.D;
  const size_t idx = static_cast<size_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n) return;
  float sk = 0.f, sv = 0.f;
  for (int c = 0; c < p.nchunks; ++c) {
    sk += p.dpk_part[static_cast<size_t>(c) * n + idx];
    sv += p.dpv_part[static_cast<size_t>(c) * n + idx];
  }
  static_cast<T*>(p.dpk)[idx] = Cvt<T>::from(sk);
  static_cast<T*>(p.dpv)[idx] = Cvt<T>::from(sv);
}

// ---------------------------------------------------------------------------------------------------
// tile configurations and launchers

// fp16/bf16: tensor-core tiles; fp32: smaller tiles (4-byte elements, same shared-memory budget).
template <typename T> struct Cfg {
  static constexpr int kFwdM = 64, kFwdN = 32;   // forward: queries x keys
  static constexpr int kDqM = 32, kDqN = 32;     // dQ: queries x keys
  static constexpr int kDkdvN = 32, kDkdvM = 32; // dK/dV: keys x queries
};
template <> struct Cfg<float> {
  static constexpr int kFwdM = 32, kFwdN = 32;
  static constexpr int kDqM = 32, kDqN = 16;
  static constexpr int kDkdvN = 16, kDkdvM = 32;
};

std::string smem_error(const char* kernel, size_t need, const Params& p) {
  return std::string("kernel ") + kernel + " needs " + std::to_string(need) +
         " bytes of shared memory at head dim " + std::to_string(p.D) + ", but the device allows " +
         std::to_string(p.max_smem) + " per block";
}

// Sets the dynamic shared-memory limit and launches; returns "" or an error message.
template <typename Kernel>
std::string launch(Kernel kernel, const char* name, size_t grid, size_t smem, const Params& p, cudaStream_t stream) {
  if (grid == 0) return "";
  if (smem > p.max_smem) return smem_error(name, smem, p);
  if (grid > 0x7fffffffu) return std::string("grid too large for ") + name;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return std::string(name) + ": cudaFuncSetAttribute: " + cudaGetErrorString(err);
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(name) + ": launch: " + cudaGetErrorString(err);
  return "";
}

template <typename T>
std::string launch_fwd(const Params& p, cudaStream_t stream) {
  using C = Cfg<T>;
  const size_t smem = FwdSmem<T, C::kFwdM, C::kFwdN>(nullptr, p.DP).bytes;
  const size_t grid = static_cast<size_t>(cdiv(p.L, C::kFwdM)) * p.B * p.Hq;
  return launch(prefix_attention_fwd<T, C::kFwdM, C::kFwdN>, "prefix_attention_fwd", grid, smem, p, stream);
}

// The backward kernels in order; those of a gradient not wanted (null output) are skipped.
template <typename T>
std::string launch_bwd(const Params& p, cudaStream_t stream) {
  using C = Cfg<T>;
  const size_t rows = static_cast<size_t>(p.B) * p.Hq * p.L;
  std::string err = launch(prefix_attention_bwd_preprocess<T>, "prefix_attention_bwd_preprocess",
                           (rows + kWarps - 1) / kWarps, 0, p, stream);
  if (err.empty() && p.dq != nullptr) {
    const size_t smem = DqSmem<T, C::kDqM, C::kDqN>(nullptr, p.DP).bytes;
    err = launch(prefix_attention_bwd_dq<T, C::kDqM, C::kDqN>, "prefix_attention_bwd_dq",
                 static_cast<size_t>(cdiv(p.L, C::kDqM)) * p.B * p.Hq, smem, p, stream);
  }
  const size_t dkdv_smem = DkdvSmem<T, C::kDkdvN, C::kDkdvM>(nullptr, p.DP).bytes;
  if (err.empty() && p.dk != nullptr) {
    err = launch(prefix_attention_bwd_dkdv<T, C::kDkdvN, C::kDkdvM>, "prefix_attention_bwd_dkdv",
                 static_cast<size_t>(cdiv(p.S, C::kDkdvN)) * p.B * p.Hkv, dkdv_smem, p, stream);
  }
  if (err.empty() && p.dpk != nullptr && p.P > 0) {
    err = launch(prefix_attention_bwd_dprefix<T, C::kDkdvN, C::kDkdvM>, "prefix_attention_bwd_dprefix",
                 static_cast<size_t>(cdiv(p.P, C::kDkdvN)) * p.T * p.Hkv * p.nchunks, dkdv_smem, p, stream);
    const size_t n = static_cast<size_t>(p.T) * p.Hkv * p.P * p.D;
    if (err.empty())
      err = launch(prefix_attention_bwd_dprefix_reduce<T>, "prefix_attention_bwd_dprefix_reduce",
                   (n + kThreads - 1) / kThreads, 0, p, stream);
  }
  return err;
}

}  // namespace

int prefix_grad_chunks(const Params& p) {
  if (p.P <= 0) return 1;
  // enough blocks to fill a large GPU (~2 x 132 SMs); a function of the prefix blocks only, never of B
  const int bn = p.dtype == kFloat32 ? Cfg<float>::kDkdvN : Cfg<__half>::kDkdvN;
  const long long owners = static_cast<long long>(cdiv(p.P, bn)) * p.T * p.Hkv;
  const long long want = (264 + owners - 1) / owners;
  return static_cast<int>(std::min<long long>(64, std::max<long long>(1, want)));
}

std::string launch_forward(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kFloat32: return launch_fwd<float>(p, stream);
    case kFloat16: return launch_fwd<__half>(p, stream);
    case kBFloat16: return launch_fwd<__nv_bfloat16>(p, stream);
    default: return "unsupported dtype";
  }
}

std::string launch_backward(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case kFloat32: return launch_bwd<float>(p, stream);
    case kFloat16: return launch_bwd<__half>(p, stream);
    case kBFloat16: return launch_bwd<__nv_bfloat16>(p, stream);
    default: return "unsupported dtype";
  }
}

}  // namespace cuda
}  // namespace prefix_kernels
