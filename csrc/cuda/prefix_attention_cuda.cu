// CUDA implementations of prefix_kernels::cpp_fwd and prefix_kernels::cpp_bwd (the schema is defined in
// csrc/ops.cpp). Checks the inputs, makes q / k / v / grad_out / out contiguous (the prefix only if it is
// not: it is never expanded per batch row), allocates the outputs and calls the kernels in
// prefix_attention_kernels.cu.

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS / cuSPARSE headers that a
// minimal CUDA toolkit lacks): the kernels need the current stream and one device attribute.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "prefix_attention_kernels.cuh"

namespace {

using at::Tensor;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return pk_cuda::kFloat32;
    case at::kHalf: return pk_cuda::kFloat16;
    case at::kBFloat16: return pk_cuda::kBFloat16;
    default: TORCH_CHECK(false, "prefix_attention cuda backend: q must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "prefix_attention cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "prefix_attention cuda backend: ", name, " is on ", t.device(),
              " but q is on ", q.device());
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "prefix_attention cuda backend: ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
}

// Validates the forward inputs and fills the shape / option fields of Params (not the pointers).
pk_cuda::Params make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                            const Tensor& prefix_v, const std::optional<Tensor>& key_padding_mask,
                            const std::optional<Tensor>& prefix_index, bool causal, double scale,
                            double dropout_p, int64_t seed) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  check_cuda(prefix_k, "prefix_k", q);
  check_cuda(prefix_v, "prefix_v", q);
  pk_cuda::Params p;
  p.dtype = dtype_code(q.scalar_type());
  check_same_dtype(k, "k", q);
  check_same_dtype(v, "v", q);
  check_same_dtype(prefix_k, "prefix_k", q);
  check_same_dtype(prefix_v, "prefix_v", q);

  TORCH_CHECK(q.dim() == 4, "prefix_attention cuda backend: q must be [B, Hq, L, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "prefix_attention cuda backend: k and v must be [B, Hkv, S, D], got ",
              k.sizes(), " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "prefix_attention cuda backend: k must be [B=", B, ", Hkv, S, D=", D,
              "], got ", k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_attention cuda backend: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(D >= 1 && D <= 256, "prefix_attention cuda backend: head dim must be in [1, 256], got ", D);
  TORCH_CHECK(B >= 1 && Hq >= 1 && L >= 1, "prefix_attention cuda backend: q must have B, Hq, L >= 1, got ", q.sizes());

  int64_t T = 1, P = 0;
  if (prefix_index.has_value()) {
    const Tensor& idx = *prefix_index;
    check_cuda(idx, "prefix_index", q);
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == B,
                "prefix_attention cuda backend: prefix_index must be int64 [B=", B, "], got ", idx.scalar_type(), " ",
                idx.sizes());
    TORCH_CHECK(prefix_k.dim() == 4 && prefix_k.size(1) == Hkv && prefix_k.size(3) == D,
                "prefix_attention cuda backend: prefix_k must be [T, Hkv=", Hkv, ", P, D=", D,
                "] with prefix_index, got ", prefix_k.sizes());
    T = prefix_k.size(0);
    P = prefix_k.size(2);
    TORCH_CHECK(T >= 1, "prefix_attention cuda backend: prefix_k must hold at least one prefix, got ", prefix_k.sizes());
  } else {
    TORCH_CHECK(prefix_k.dim() == 3 && prefix_k.size(0) == Hkv && prefix_k.size(2) == D,
                "prefix_attention cuda backend: prefix_k must be [Hkv=", Hkv, ", P, D=", D, "], got ", prefix_k.sizes());
    P = prefix_k.size(1);
  }
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "prefix_attention cuda backend: prefix_v must have the shape of prefix_k ",
              prefix_k.sizes(), ", got ", prefix_v.sizes());
  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    check_cuda(m, "key_padding_mask", q);
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == S,
                "prefix_attention cuda backend: key_padding_mask must be bool [B=", B, ", S=", S, "], got ",
                m.scalar_type(), " ", m.sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "prefix_attention cuda backend: dropout_p must be in [0, 1), got ",
              dropout_p);
  // 32-bit indices inside the kernels index rows and blocks; element offsets are 64-bit.
  TORCH_CHECK(B * Hq * L < (int64_t{1} << 31) && B * Hkv * S < (int64_t{1} << 31) && T * Hkv * P < (int64_t{1} << 31),
              "prefix_attention cuda backend: too many rows for 32-bit row indices");

  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.L = static_cast<int>(L);
  p.S = static_cast<int>(S);
  p.P = static_cast<int>(P);
  p.D = static_cast<int>(D);
  p.T = static_cast<int>(T);
  p.DP = static_cast<int>((D + 15) / 16 * 16);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  p.max_smem = static_cast<size_t>(optin);
  return p;
}

void check_launch(const std::string& err) {
  TORCH_CHECK(err.empty(), err);
}

std::tuple<Tensor, Tensor> cpp_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const Tensor& prefix_k_in, const Tensor& prefix_v_in,
                                        const std::optional<Tensor>& key_padding_mask,
                                        const std::optional<Tensor>& prefix_index, bool causal, double scale,
                                        double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  pk_cuda::Params p = make_params(q_in, k_in, v_in, prefix_k_in, prefix_v_in, key_padding_mask, prefix_index, causal,
                                  scale, dropout_p, seed);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor pk = prefix_k_in.contiguous(), pv = prefix_v_in.contiguous();
  Tensor kpm, pidx;
  if (key_padding_mask.has_value()) kpm = key_padding_mask->contiguous();
  if (prefix_index.has_value()) pidx = prefix_index->contiguous();

  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.pk = pk.data_ptr();
  p.pv = pv.data_ptr();
  p.kpm = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  p.pidx = pidx.defined() ? pidx.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(pk_cuda::launch_forward(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpp_bwd_cuda(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& prefix_k_in,
    const Tensor& prefix_v_in, const Tensor& out_in, const Tensor& lse_in, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& prefix_index, bool causal, double scale, double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  pk_cuda::Params p = make_params(q_in, k_in, v_in, prefix_k_in, prefix_v_in, key_padding_mask, prefix_index, causal,
                                  scale, dropout_p, seed);
  check_cuda(grad_out_in, "grad_out", q_in);
  check_cuda(out_in, "out", q_in);
  check_cuda(lse_in, "lse", q_in);
  check_same_dtype(grad_out_in, "grad_out", q_in);
  check_same_dtype(out_in, "out", q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention cuda backend: grad_out and out must have the shape of q ", q_in.sizes(), ", got ",
              grad_out_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 && lse_in.size(0) == p.B &&
                  lse_in.size(1) == p.Hq && lse_in.size(2) == p.L,
              "prefix_attention cuda backend: lse must be float32 [B, Hq, L], got ", lse_in.scalar_type(), " ",
              lse_in.sizes());

  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor pk = prefix_k_in.contiguous(), pv = prefix_v_in.contiguous();
  const Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  Tensor kpm, pidx;
  if (key_padding_mask.has_value()) kpm = key_padding_mask->contiguous();
  if (prefix_index.has_value()) pidx = prefix_index->contiguous();

  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor dpk = at::empty(pk.sizes(), pk.options());
  Tensor dpv = at::empty(pv.sizes(), pv.options());
  Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  p.nchunks = pk_cuda::prefix_grad_chunks(p);
  Tensor parts;  // fp32 partial sums of the prefix gradients: [2, nchunks, T, Hkv, P, D], independent of B
  if (p.P > 0) parts = at::empty({2, p.nchunks, p.T, p.Hkv, p.P, p.D}, q.options().dtype(at::kFloat));

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.pk = pk.data_ptr();
  p.pv = pv.data_ptr();
  p.kpm = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  p.pidx = pidx.defined() ? pidx.data_ptr<int64_t>() : nullptr;
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = grad_out.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dpk = dpk.data_ptr();
  p.dpv = dpv.data_ptr();
  if (parts.defined()) {
    p.dpk_part = parts[0].data_ptr<float>();
    p.dpv_part = parts[1].data_ptr<float>();
  }
  check_launch(pk_cuda::launch_backward(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace

TORCH_LIBRARY_IMPL(prefix_kernels, CUDA, m) {
  m.impl("cpp_fwd", &cpp_fwd_cuda);
  m.impl("cpp_bwd", &cpp_bwd_cuda);
}
