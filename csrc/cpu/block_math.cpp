#include "block_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_HAVE_AVX2_CLONE 1
#include <immintrin.h>  // the intrinsics are usable inside the avx2 clone's target region
#endif

#define PK_INLINE __attribute__((always_inline))

namespace prefix_kernels {
namespace cpu {

namespace base {
#include "block_math_impl.h"
}  // namespace base

#ifdef PK_HAVE_AVX2_CLONE
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define PK_AVX2_INTRINSICS 1
#include "block_math_impl.h"
#undef PK_AVX2_INTRINSICS
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {
bool use_avx2() {
#ifdef PK_HAVE_AVX2_CLONE
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}
}  // namespace

#ifdef PK_HAVE_AVX2_CLONE
#define PK_DISPATCH(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define PK_DISPATCH(fn, ...) base::fn(__VA_ARGS__)
#endif

void softmax_update(float* s, int64_t rows, int64_t cols, float* m, float* l, float* alpha) {
  PK_DISPATCH(softmax_update, s, rows, cols, m, l, alpha);
}
void probs_from_lse(float* s, int64_t rows, int64_t cols, const float* lse) {
  PK_DISPATCH(probs_from_lse, s, rows, cols, lse);
}
void softmax_grad(const float* p, float* dp, int64_t rows, int64_t cols, const float* delta) {
  PK_DISPATCH(softmax_grad, p, dp, rows, cols, delta);
}
void softcap_scores(float* s, int64_t n, float cap, float* th) { PK_DISPATCH(softcap_scores, s, n, cap, th); }
void softcap_grad(float* ds, const float* th, int64_t n) { PK_DISPATCH(softcap_grad, ds, th, n); }
void scale_rows(float* acc, int64_t rows, int64_t cols, const float* alpha) {
  PK_DISPATCH(scale_rows, acc, rows, cols, alpha);
}
void mul_inplace(float* x, const float* y, int64_t n) { PK_DISPATCH(mul_inplace, x, y, n); }
void dropout_row(float* z, int64_t n, uint64_t seed, uint64_t offset, float dropout_p, float inv_keep) {
  PK_DISPATCH(dropout_row, z, n, seed, offset, dropout_p, inv_keep);
}

}  // namespace cpu
}  // namespace prefix_kernels

// Fortran BLAS from libtorch_cpu (MKL / OpenBLAS), weak so the extension loads without it. Only used when
// PREFIX_KERNELS_CPU_BLAS=1 (for comparisons): MKL's small sgemm serializes threads on a critical section.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace prefix_kernels {
namespace cpu {

static bool use_blas() {
  static const bool yes = [] {
    const char* env = std::getenv("PREFIX_KERNELS_CPU_BLAS");
    return sgemm_ != nullptr && env != nullptr && env[0] == '1';
  }();
  return yes;
}

void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool accumulate = beta != 0.f;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (use_blas()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(std::max<int64_t>(ldb, trans_b ? K : N));
    const int lb = static_cast<int>(std::max<int64_t>(lda, trans_a ? M : K));
    const int lc = static_cast<int>(std::max<int64_t>(ldc, N));
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  // op(A)(i, p) = A[i * ars + p * acs]; op(B) is used as a row-major [K, N] matrix, packed when transposed.
  const int64_t ars = trans_a ? 1 : lda, acs = trans_a ? lda : 1;
  if (trans_b && !trans_a && M <= 8) {
    PK_DISPATCH(gemm_nt_small, M, N, K, alpha, A, lda, B, ldb, accumulate, C, ldc);
    return;
  }
  if (trans_b) {
    thread_local std::vector<float> packed;
    if (static_cast<int64_t>(packed.size()) < K * N) packed.resize(K * N);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t p = 0; p < K; ++p) packed[p * N + j] = B[j * ldb + p];
    B = packed.data();
    ldb = N;
  }
  PK_DISPATCH(gemm_tile, M, N, K, alpha, A, ars, acs, B, ldb, accumulate, C, ldc);
}

}  // namespace cpu
}  // namespace prefix_kernels
