// Interface between the CUDA kernels (prefix_attention_kernels.cu, no torch headers) and the op binding
// (prefix_attention_cuda.cu). Plain C++ types only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace prefix_kernels {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every tensor is contiguous (the binding makes q, k, v, grad_out, out and the prefix contiguous, and
// allocates contiguous outputs). In the backward a null dq, dk (with dv) or dpk (with dpv) is a gradient not
// wanted: the kernels that only produce it are not launched.
struct Params {
  // forward inputs
  const void* q = nullptr;   // [B, Hq, L, D]
  const void* k = nullptr;   // [B, Hkv, S, D]
  const void* v = nullptr;   // [B, Hkv, S, D]
  const void* pk = nullptr;  // [T, Hkv, P, D] (T = 1 without prefix_index)
  const void* pv = nullptr;  // [T, Hkv, P, D]
  const bool* kpm = nullptr;          // [B, S], true = real token; null = no padding
  const int64_t* pidx = nullptr;      // [B] in [0, T); null = prefix 0 for every row
  // forward outputs / backward inputs
  void* out = nullptr;    // [B, Hq, L, D]
  float* lse = nullptr;   // [B, Hq, L], natural log, +inf for rows with no visible key
  // backward
  const void* dout = nullptr;   // [B, Hq, L, D]
  float* delta = nullptr;       // [B, Hq, L] workspace: rowsum(dO * O)
  void* dq = nullptr;           // [B, Hq, L, D]
  void* dk = nullptr;           // [B, Hkv, S, D]
  void* dv = nullptr;           // [B, Hkv, S, D]
  float* dpk_part = nullptr;    // [nchunks, T, Hkv, P, D] fp32 partial sums
  float* dpv_part = nullptr;    // [nchunks, T, Hkv, P, D]
  void* dpk = nullptr;          // [T, Hkv, P, D]
  void* dpv = nullptr;          // [T, Hkv, P, D]

  int B = 0, Hq = 0, Hkv = 0, L = 0, S = 0, P = 0, D = 0, T = 1;
  int DP = 0;        // D rounded up to a multiple of 16 (shared-memory tile width)
  int nchunks = 1;   // number of fp32 partial buffers of the prefix gradients (independent of B)
  bool causal = false;
  float scale = 1.f;
  float dropout_p = 0.f;
  uint64_t seed = 0;
  int dtype = kFloat32;
  size_t max_smem = 48 * 1024;  // the device's opt-in shared memory per block
};

// Number of prefix-gradient chunks for a launch: a function of the prefix blocks only (never of B).
int prefix_grad_chunks(const Params& p);

// Each launcher returns "" on success, else an error message without prefix (nothing more is launched then).
std::string launch_forward(const Params& p, cudaStream_t stream);
std::string launch_backward(const Params& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace prefix_kernels
