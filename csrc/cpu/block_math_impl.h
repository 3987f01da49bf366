// The elementwise tile loops of block_math.cpp, included twice: once for baseline x86-64, once under
// `#pragma GCC target("avx2,fma")`; block_math.cpp picks one at run time. No include guard on purpose.

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 8 floats as a GCC vector: the default clone lowers it to SSE pairs, the haswell clone to AVX2 + FMA.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

PK_INLINE inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
PK_INLINE inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
PK_INLINE inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
PK_INLINE inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
PK_INLINE inline v8f vmin(v8f a, v8f b) { return a < b ? a : b; }
PK_INLINE inline float hmax(v8f v) {
  float m = v[0];
  for (int k = 1; k < 8; ++k) m = std::max(m, v[k]);
  return m;
}
PK_INLINE inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// expf to about 2 ulp on [-87.3, 88.4] and exactly 0 below, so exp(-inf) = 0 (Cephes' polynomial, range
// reduction by round-to-nearest with the 1.5 * 2^23 trick).
PK_INLINE inline v8f vexp(v8f x) {
  const v8i under = x < splat(-87.33654f);
  const v8i nan = x != x;  // the clamp below would turn NaN into a number; PyTorch propagates it
  x = vmin(vmax(x, splat(-87.33654f)), splat(88.3762626647949f));
  const v8f fx = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  v8f r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  v8f y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const v8i bits = (__builtin_convertvector(fx, v8i) + 127) << 23;
  const v8f res = y * reinterpret_cast<const v8f&>(bits);
  return under ? splat(0.f) : (nan ? splat(std::numeric_limits<float>::quiet_NaN()) : res);
}

// tanhf to a few ulp (Cephes: an odd polynomial for |x| <= 0.625, 1 - 2 / (exp(2|x|) + 1) above, where
// nothing cancels); NaN stays NaN and +-inf gives +-1.
PK_INLINE inline v8f vtanh(v8f x) {
  const v8f a = vmax(x, -x);
  const v8f z = x * x;
  v8f p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const v8f small = p * z * x + x;
  const v8f big = 1.f - 2.f / (vexp(a + a) + 1.f);
  return a > splat(0.625f) ? (x < splat(0.f) ? -big : big) : small;
}

// Row r of s: s = exp(s - sub), returns the row sum. Columns past `cols` in the last vector are not touched.
PK_INLINE inline float exp_row(float* row, int64_t cols, float sub) {
  v8f acc = splat(0.f);
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    const v8f e = vexp(load8(row + c) - sub);
    store8(row + c, e);
    acc += e;
  }
  if (c < cols) {
    float tmp[8];
    for (int k = 0; k < 8; ++k) tmp[k] = c + k < cols ? row[c + k] : -std::numeric_limits<float>::infinity();
    const v8f e = vexp(load8(tmp) - sub);
    store8(tmp, e);
    for (int k = 0; c + k < cols; ++k) row[c + k] = tmp[k];
    acc += e;
  }
  return hsum(acc);
}

// The row maximum, NaN if any score (or `init`) is NaN: a NaN score must poison its row as in PyTorch, and
// plain max() would drop it (the row would then look empty and output zeros).
PK_INLINE inline float max_row(const float* row, int64_t cols, float init) {
  v8f m = splat(init);
  v8i nan = v8i{} != v8i{};
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    const v8f v = load8(row + c);
    m = vmax(m, v);
    nan |= v != v;
  }
  float mx = hmax(m);
  bool any_nan = init != init;
  for (int k = 0; k < 8; ++k) any_nan |= nan[k] != 0;
  for (; c < cols; ++c) {
    any_nan |= row[c] != row[c];
    mx = std::max(mx, row[c]);
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : mx;
}


inline void softmax_update(float* s, int64_t rows, int64_t cols, float* m, float* l, float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    const float mx = max_row(row, cols, m[r]);
    if (mx == kNegInf) {  // nothing visible yet in this row
      alpha[r] = 1.f;
      std::fill(row, row + cols, 0.f);
      continue;
    }
    alpha[r] = m[r] == kNegInf ? 0.f : std::exp(m[r] - mx);
    l[r] = l[r] * alpha[r] + exp_row(row, cols, mx);
    m[r] = mx;
  }
}

inline void probs_from_lse(float* s, int64_t rows, int64_t cols, const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * cols;
    const float sub = lse[r];
    if (sub == std::numeric_limits<float>::infinity()) {  // an empty row: no probabilities
      std::fill(row, row + cols, 0.f);
      continue;
    }
    exp_row(row, cols, sub);
  }
}

inline void softmax_grad(const float* p, float* dp, int64_t rows, int64_t cols, const float* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float d = delta[r];
    const float* pr = p + r * cols;
    float* dr = dp + r * cols;
    for (int64_t c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - d);
  }
}

inline void softcap_scores(float* s, int64_t n, float cap, float* th) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const v8f t = vtanh(load8(s + c) / cap);
    if (th != nullptr) store8(th + c, t);
    store8(s + c, t * cap);
  }
  if (c < n) {  // the tail through a padded vector, so every element gets the same tanh
    float tmp[8] = {};
    std::copy(s + c, s + n, tmp);
    const v8f t = vtanh(load8(tmp) / cap);
    for (int k = 0; c + k < n; ++k) {
      if (th != nullptr) th[c + k] = t[k];
      s[c + k] = t[k] * cap;
    }
  }
}

inline void softcap_grad(float* ds, const float* th, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] *= 1.f - th[i] * th[i];
}

inline void scale_rows(float* acc, int64_t rows, int64_t cols, const float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    const float a = alpha[r];
    if (a == 1.f) continue;
    float* row = acc + r * cols;
    for (int64_t c = 0; c < cols; ++c) row[c] *= a;
  }
}

inline void mul_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= y[i];
}


// C[M, N] = beta * C + alpha * sum_p a(i, p) * B[p, :] with a(i, p) = A[i * ars + p * acs] and B row-major
// (leading dim ldb); beta is 0 or 1. Register blocks of R rows x 16 columns; a fixed summation order over p.
template <int R>
PK_INLINE inline void gemm_rows(int64_t N, int64_t K, float alpha, const float* A, int64_t ars, int64_t acs,
                                const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) {
    v8f acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = splat(0.f);
    for (int64_t p = 0; p < K; ++p) {
      const v8f b0 = load8(B + p * ldb + j), b1 = load8(B + p * ldb + j + 8);
      for (int r = 0; r < R; ++r) {
        const v8f a = splat(A[r * ars + p * acs]);
        acc0[r] += a * b0;
        acc1[r] += a * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + j;
      const v8f c0 = acc0[r] * alpha, c1 = acc1[r] * alpha;
      store8(c, accumulate ? load8(c) + c0 : c0);
      store8(c + 8, accumulate ? load8(c + 8) + c1 : c1);
    }
  }
  for (; j + 8 <= N; j += 8) {
    v8f acc[R];
    for (int r = 0; r < R; ++r) acc[r] = splat(0.f);
    for (int64_t p = 0; p < K; ++p) {
      const v8f b = load8(B + p * ldb + j);
      for (int r = 0; r < R; ++r) acc[r] += splat(A[r * ars + p * acs]) * b;
    }
    for (int r = 0; r < R; ++r) {
      float* c = C + r * ldc + j;
      store8(c, accumulate ? load8(c) + acc[r] * alpha : acc[r] * alpha);
    }
  }
  for (; j < N; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t p = 0; p < K; ++p) acc += A[r * ars + p * acs] * B[p * ldb + j];
      C[r * ldc + j] = accumulate ? C[r * ldc + j] + acc * alpha : acc * alpha;
    }
  }
}

inline void gemm_tile(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t ars, int64_t acs,
                      const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) gemm_rows<4>(N, K, alpha, A + i * ars, ars, acs, B, ldb, accumulate, C + i * ldc, ldc);
  switch (M - i) {
    case 3: gemm_rows<3>(N, K, alpha, A + i * ars, ars, acs, B, ldb, accumulate, C + i * ldc, ldc); break;
    case 2: gemm_rows<2>(N, K, alpha, A + i * ars, ars, acs, B, ldb, accumulate, C + i * ldc, ldc); break;
    case 1: gemm_rows<1>(N, K, alpha, A + i * ars, ars, acs, B, ldb, accumulate, C + i * ldc, ldc); break;
    default: break;
  }
}

// C[M, N] = beta * C + alpha * A B^T for M <= 8 rows of A (row-major, lda) and B row-major [N, K] (ldb):
// one pass over B's rows with M dot products each, so B is never transposed. A query block of one to eight
// rows (decode) spends more time packing B^T than multiplying; this path reads K rows as they are stored.
// Each output element's summation order is the same for every M.
template <int R>
PK_INLINE inline void gemm_nt_rows(int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                                   const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; ++j) {
    const float* b = B + j * ldb;
    v8f acc[R];
    for (int r = 0; r < R; ++r) acc[r] = splat(0.f);
    int64_t p = 0;
    for (; p + 8 <= K; p += 8) {
      const v8f bv = load8(b + p);
      for (int r = 0; r < R; ++r) acc[r] += load8(A + r * lda + p) * bv;
    }
    for (int r = 0; r < R; ++r) {
      float dot = hsum(acc[r]);
      for (int64_t q = p; q < K; ++q) dot += A[r * lda + q] * b[q];
      float* c = C + r * ldc + j;
      *c = accumulate ? *c + dot * alpha : dot * alpha;
    }
  }
}

inline void gemm_nt_small(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
                          int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  switch (M) {
    case 8: gemm_nt_rows<8>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 7: gemm_nt_rows<7>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 6: gemm_nt_rows<6>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 5: gemm_nt_rows<5>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 4: gemm_nt_rows<4>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 3: gemm_nt_rows<3>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 2: gemm_nt_rows<2>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    case 1: gemm_nt_rows<1>(N, K, alpha, A, lda, B, ldb, accumulate, C, ldc); break;
    default: break;
  }
}

#ifdef PK_AVX2_INTRINSICS
// Philox4x32-10 on 8 counters (c0 = offset + lane low 32 bits, c1 = high bits), first output word only,
// exactly as philox_first_word. AVX2 has no 32x32->64 multiply of all lanes: even lanes go through
// _mm256_mul_epu32 directly, odd lanes after a 32-bit shift, and the high words are blended back.
PK_INLINE inline __m256i philox8_first_word(uint64_t seed, uint64_t offset) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i base = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset)));
  const __m256i lo = _mm256_add_epi32(base, lane);
  // the high word carries where the low word wrapped (lo < base unsigned: compare with the sign bit flipped)
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(sign, base), _mm256_xor_si256(sign, lo));
  __m256i c0 = lo;
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset >> 32))), carry);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ra = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i rb = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    // a0 * ROUND_A and a2 * ROUND_B as (hi, lo) 32-bit words per lane
    const __m256i pa_even = _mm256_mul_epu32(c0, ra), pa_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ra);
    const __m256i pb_even = _mm256_mul_epu32(c2, rb), pb_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), rb);
    const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pa_even, 32), pa_odd, 0xAA);
    const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(pb_even, 32), pb_odd, 0xAA);
    const __m256i lo_a = _mm256_blend_epi32(pa_even, _mm256_slli_epi64(pa_odd, 32), 0xAA);
    const __m256i lo_b = _mm256_blend_epi32(pb_even, _mm256_slli_epi64(pb_odd, 32), 0xAA);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c0 = n0, c2 = n2, c1 = lo_b, c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

inline void dropout_row(float* z, int64_t n, uint64_t seed, uint64_t offset, float dropout_p, float inv_keep) {
  int64_t c = 0;
  const __m256 p = _mm256_set1_ps(dropout_p), keep = _mm256_set1_ps(inv_keep);
  for (; c + 8 <= n; c += 8) {
    __m256i x = philox8_first_word(seed, offset + static_cast<uint64_t>(c));
    x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // x < 0 ? ~x : x (philox_uniform)
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
    _mm256_storeu_ps(z + c, _mm256_and_ps(_mm256_cmp_ps(u, p, _CMP_GE_OQ), keep));
  }
  for (; c < n; ++c) z[c] = dropout_keep(seed, offset + static_cast<uint64_t>(c), dropout_p) ? inv_keep : 0.f;
}
#else
inline void dropout_row(float* z, int64_t n, uint64_t seed, uint64_t offset, float dropout_p, float inv_keep) {
  for (int64_t c = 0; c < n; ++c)
    z[c] = dropout_keep(seed, offset + static_cast<uint64_t>(c), dropout_p) ? inv_keep : 0.f;
}
#endif
