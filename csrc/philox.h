// Dropout RNG shared by the C++ CPU and CUDA kernels: Triton's Philox4x32-10 (tl.rand), bit for bit, so that
// every backend draws the same dropout mask for the same seed (docs/op.md, dropout; prefix_kernels/ops/dropout.py
// is the same generator in torch).
//
// keep(b, h, i, c) for key column c in [0, P + S) (prefix columns first) uses the counter
//   offset = ((b * Hq + h) * L + i) * (P + S) + c      (uint64)
// c0 = low 32 bits of offset, c1 = high 32 bits, c2 = c3 = 0; key = (seed low 32, seed high 32); 10 rounds.
// The first output word becomes a float in [0, 1) exactly as triton.language.random.uint_to_uniform_float.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PK_PHILOX_FN __host__ __device__ __forceinline__
#else
#define PK_PHILOX_FN inline
#endif

namespace prefix_kernels {

PK_PHILOX_FN uint32_t philox_umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

// First output word of Philox4x32-10 at counter (offset, 0) under key seed.
PK_PHILOX_FN uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  constexpr uint32_t ROUND_A = 0xD2511F53u, ROUND_B = 0xCD9E8D57u;
  constexpr uint32_t KEY_A = 0x9E3779B9u, KEY_B = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_umulhi(ROUND_B, a2) ^ c1 ^ k0;
    c2 = philox_umulhi(ROUND_A, a0) ^ c3 ^ k1;
    c1 = ROUND_B * a2;
    c3 = ROUND_A * a0;
    k0 += KEY_A;
    k1 += KEY_B;
  }
  return c0;
}

// triton.language.random.uint_to_uniform_float for a 32-bit word.
PK_PHILOX_FN float philox_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// True when the element at `offset` is kept by dropout with probability dropout_p of dropping.
PK_PHILOX_FN bool dropout_keep(uint64_t seed, uint64_t offset, float dropout_p) {
  return philox_uniform(philox_first_word(seed, offset)) >= dropout_p;
}

}  // namespace prefix_kernels
