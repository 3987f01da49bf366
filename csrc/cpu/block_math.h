// The work on one fp32 tile of the CPU kernels: online softmax, its gradient, and the tile matrix products.
// block_math_impl.h holds the loops; block_math.cpp compiles them twice (AVX2+FMA and baseline x86-64) and
// picks one at run time from the CPU's features.
#pragma once

#include <cstdint>

namespace prefix_kernels {
namespace cpu {

// Online-softmax step over a masked score tile s [rows, cols] (-inf = hidden key). On return s holds
// exp(s - m_new) (0 for hidden keys); m, l are updated and alpha[r] = exp(m_old - m_new) rescales the
// accumulator of row r. Rows that have seen no visible key yet keep m = -inf, l = 0, alpha = 1, s = 0.
void softmax_update(float* s, int64_t rows, int64_t cols, float* m, float* l, float* alpha);

// s = exp(s - lse[r]) row by row (the probabilities of the forward pass; lse = +inf gives 0).
void probs_from_lse(float* s, int64_t rows, int64_t cols, const float* lse);

// ds = p * (dp - delta[r]) row by row (written into dp).
void softmax_grad(const float* p, float* dp, int64_t rows, int64_t cols, const float* delta);

// Soft-capping of n scaled scores: s = cap * tanh(s / cap), keeping tanh(s / cap) in th for the backward (th may
// be null in the forward).
void softcap_scores(float* s, int64_t n, float cap, float* th);

// ds *= 1 - th^2 (n elements): the soft-cap's derivative, applied to the gradient of the capped scores.
void softcap_grad(float* ds, const float* th, int64_t n);

// acc[r, :] *= alpha[r].
void scale_rows(float* acc, int64_t rows, int64_t cols, const float* alpha);

// x *= y elementwise (n elements).
void mul_inplace(float* x, const float* y, int64_t n);

// z[c] = inv_keep if dropout keeps the element at Philox counter offset + c, else 0, for c in [0, n): the
// same draws as philox.h's dropout_keep (8 counters at a time with AVX2).
void dropout_row(float* z, int64_t n, uint64_t seed, uint64_t offset, float dropout_p, float inv_keep);

}  // namespace cpu
}  // namespace prefix_kernels

namespace prefix_kernels {
namespace cpu {

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C (op = transpose when trans_*; beta 0 or 1), for tiles
// of at most a few hundred rows and columns: register-blocked AVX2/FMA (or baseline) loops with a fixed
// summation order, so results never depend on threads. (Not BLAS: MKL's small sgemm serializes threads on a
// critical section in its packing routines.)
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace prefix_kernels
