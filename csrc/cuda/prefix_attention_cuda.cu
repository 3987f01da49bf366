// CUDA implementations of prefix_kernels::cuda_fwd and cuda_bwd (the op contract: docs/op.md): check the
// inputs, make contiguous what the kernels read, allocate the outputs, fill Params and call the launchers of
// prefix_attention_kernels.cu.

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS / cuSPARSE headers that a
// minimal CUDA toolkit lacks): the kernels need the current stream and one device attribute.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "../problem.h"
#include "prefix_attention_kernels.cuh"

namespace prefix_kernels {
namespace cuda {
namespace {

using at::Tensor;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: PREFIX_KERNELS_CHECK(false, "unsupported dtype ", t);
  }
  return -1;
}

// Limits of the CUDA kernels beyond the op contract: 32-bit row and block indices (element offsets are
// 64-bit) and the head dims their shared-memory tiles are built for.
void check_kernel_limits(const Problem& pr) {
  PREFIX_KERNELS_CHECK(pr.D >= 1 && pr.D <= 256, "the cuda kernels take head dims 1 to 256, got ", pr.D);
  PREFIX_KERNELS_CHECK(pr.B >= 1 && pr.Hq >= 1 && pr.L >= 1, "the cuda kernels need B, Hq, L >= 1");
  constexpr int64_t kMaxRows = int64_t{1} << 31;
  PREFIX_KERNELS_CHECK(pr.B * pr.Hq * pr.L < kMaxRows && pr.B * pr.Hkv * pr.S < kMaxRows &&
                           pr.T * pr.Hkv * pr.P < kMaxRows,
                       "too many rows for the cuda kernels' 32-bit row indices");
}

// The inputs as the kernels read them: contiguous (a no-op for what already is; the prefix is never
// expanded per batch row, so its copy, if any, is small).
struct Inputs {
  Tensor q, k, v, pk, pv, kpm, pidx;
  Inputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& pk_, const Tensor& pv_,
         const std::optional<Tensor>& kpm_, const std::optional<Tensor>& pidx_)
      : q(q_.contiguous()), k(k_.contiguous()), v(v_.contiguous()), pk(pk_.contiguous()), pv(pv_.contiguous()) {
    if (kpm_.has_value()) kpm = kpm_->contiguous();
    if (pidx_.has_value()) pidx = pidx_->contiguous();
  }
};

// make_params, step 1: the shape and option fields, and the device's shared-memory limit.
Params shape_params(const Problem& pr, const Tensor& q) {
  Params p;
  p.dtype = dtype_code(q.scalar_type());
  p.B = static_cast<int>(pr.B);
  p.Hq = static_cast<int>(pr.Hq);
  p.Hkv = static_cast<int>(pr.Hkv);
  p.L = static_cast<int>(pr.L);
  p.S = static_cast<int>(pr.S);
  p.P = static_cast<int>(pr.P);
  p.D = static_cast<int>(pr.D);
  p.T = static_cast<int>(pr.T);
  p.DP = static_cast<int>((pr.D + 15) / 16 * 16);
  p.causal = pr.causal;
  p.scale = pr.scale;
  p.dropout_p = pr.dropout_p;
  p.seed = pr.seed;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  p.max_smem = static_cast<size_t>(optin);
  return p;
}

// make_params, step 2: the input pointers.
void set_input_pointers(Params& p, const Inputs& in) {
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.pk = in.pk.data_ptr();
  p.pv = in.pv.data_ptr();
  p.kpm = in.kpm.defined() ? in.kpm.data_ptr<bool>() : nullptr;
  p.pidx = in.pidx.defined() ? in.pidx.data_ptr<int64_t>() : nullptr;
}

// make_params, step 3 (backward, prefix gradients wanted): the chunking of the prefix-gradient reduction and
// its fp32 partial sums [2, nchunks, T, Hkv, P, D], independent of B. Returns the buffer to keep alive.
Tensor set_prefix_chunks(Params& p, const Tensor& q) {
  p.nchunks = prefix_grad_chunks(p);
  if (p.P == 0) return Tensor();
  Tensor parts = at::empty({2, p.nchunks, p.T, p.Hkv, p.P, p.D}, q.options().dtype(at::kFloat));
  p.dpk_part = parts[0].data_ptr<float>();
  p.dpv_part = parts[1].data_ptr<float>();
  return parts;
}

// The kernels have no strided store: they write a contiguous buffer, which is the output itself when the
// output (with the layout of its input, docs/op.md) is contiguous, and else is copied into it afterwards.
struct Output {
  Tensor result, buffer;
  explicit Output(Tensor like_input) : result(std::move(like_input)) {
    buffer = result.is_contiguous() ? result : at::empty(result.sizes(), result.options());
  }
  void* data() const { return buffer.data_ptr(); }
  const Tensor& finish() {
    if (!buffer.is_same(result)) result.copy_(buffer);
    return result;
  }
};

void check_launch(const std::string& err) { PREFIX_KERNELS_CHECK(err.empty(), err); }

// `deterministic` is part of every backend's schema; the CUDA kernels use no atomics and are always
// deterministic.
std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                               const Tensor& prefix_v, const std::optional<Tensor>& key_padding_mask,
                               const std::optional<Tensor>& prefix_index, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& sinks, bool causal, int64_t window, double softcap, double scale,
                               double dropout_p, int64_t seed, bool /*deterministic*/) {
  refuse_features("cuda", cu_seqlens, sinks, window, softcap);
  const Problem pr = check_inputs(at::kCUDA, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal,
                                  scale, dropout_p, seed);
  check_kernel_limits(pr);
  const c10::cuda::CUDAGuard guard(q.device());
  const Inputs in(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index);
  Params p = shape_params(pr, q);
  set_input_pointers(p, in);

  Output out(at::empty_like(q));
  Tensor lse = at::empty({pr.B, pr.Hq, pr.L}, q.options().dtype(at::kFloat));
  p.out = out.data();
  p.lse = lse.data_ptr<float>();
  check_launch(launch_forward(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out.finish(), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
    const Tensor& prefix_v, const Tensor& out, const Tensor& lse, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& prefix_index, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& sinks, bool causal, int64_t window, double softcap, double scale, double dropout_p, int64_t seed,
    bool /*deterministic*/, std::array<bool, 3> output_mask) {
  refuse_features("cuda", cu_seqlens, sinks, window, softcap);
  const Problem pr = check_inputs(at::kCUDA, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal,
                                  scale, dropout_p, seed);
  check_backward_inputs(pr, q, grad_out, out, lse);
  check_kernel_limits(pr);
  const Wanted want(output_mask);
  Output dq(gradient_like(q, want.dq));
  Output dk(gradient_like(k, want.dkdv)), dv(gradient_like(v, want.dkdv));
  Output dpk(gradient_like(prefix_k, want.dprefix)), dpv(gradient_like(prefix_v, want.dprefix));
  if (!want.any()) return {dq.result, dk.result, dv.result, dpk.result, dpv.result};

  const c10::cuda::CUDAGuard guard(q.device());
  const Inputs in(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index);
  const Tensor grad_out_c = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  Params p = shape_params(pr, q);
  set_input_pointers(p, in);
  p.out = const_cast<void*>(out_c.data_ptr());
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = grad_out_c.data_ptr();
  Tensor delta = at::empty({pr.B, pr.Hq, pr.L}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  if (want.dq) p.dq = dq.data();
  if (want.dkdv) p.dk = dk.data(), p.dv = dv.data();
  Tensor parts;
  if (want.dprefix) {
    p.dpk = dpk.data(), p.dpv = dpv.data();
    parts = set_prefix_chunks(p, q);
  }
  check_launch(launch_backward(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {dq.finish(), dk.finish(), dv.finish(), dpk.finish(), dpv.finish()};
}

}  // namespace
}  // namespace cuda
}  // namespace prefix_kernels

// The schemas are defined by prefix_kernels.ops (Python) before it loads this library.
TORCH_LIBRARY_IMPL(prefix_kernels, CUDA, m) {
  m.impl("cuda_fwd", &prefix_kernels::cuda::fwd);
  m.impl("cuda_bwd", &prefix_kernels::cuda::bwd);
}
