// The problem of one call of the prefix_kernels ops (docs/op.md) and the input check shared by the CPU
// (csrc/cpu) and CUDA (csrc/cuda) implementations.
//
// prefix_kernels.ops validates every input with messages written for users before it calls an op, so
// check_inputs is only a cheap guard against calling the ops directly with tensors the kernels would misread:
// ranks, shapes, dtypes and devices. It reads no tensor data (a range check of prefix_index would sync a
// GPU; the CPU implementation does it itself). Strides are free: the CPU kernels read through them, and the
// CUDA binding makes contiguous copies of what its kernels need contiguous.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>

// Every error of the C++ implementations carries the one prefix "prefix_kernels: ".
#define PREFIX_KERNELS_CHECK(cond, ...) TORCH_CHECK(cond, "prefix_kernels: ", __VA_ARGS__)

namespace prefix_kernels {

struct Problem {
  int64_t B, Hq, Hkv, group, L, S, P, D, T;  // group = Hq / Hkv; T = 1 without prefix_index
  bool causal;
  float scale;
  float dropout_p;
  uint64_t seed;
};

namespace detail {

inline void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  PREFIX_KERNELS_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q");
  PREFIX_KERNELS_CHECK(t.device() == q.device(), name, " must be on the device of q");
}

inline void check_on_q_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  PREFIX_KERNELS_CHECK(t.device() == q.device(), name, " must be on the device of q");
}

}  // namespace detail

// The inputs of {cpu,cuda}_fwd (and the shared ones of _bwd) for an implementation on `device`.
inline Problem check_inputs(at::DeviceType device, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& prefix_index, bool causal, double scale,
                            double dropout_p, int64_t seed,
                            const std::optional<at::Tensor>& cu_seqlens = std::nullopt) {
  PREFIX_KERNELS_CHECK(q.device().type() == device, "q must be a ", c10::DeviceTypeName(device, true), " tensor");
  const auto dtype = q.scalar_type();
  PREFIX_KERNELS_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                       "q must be float32, float16 or bfloat16, got ", dtype);
  detail::check_like_q(k, q, "k");
  detail::check_like_q(v, q, "v");
  detail::check_like_q(prefix_k, q, "prefix_k");
  detail::check_like_q(prefix_v, q, "prefix_v");

  PREFIX_KERNELS_CHECK(q.dim() == 4, "q must be [B, Hq, L, D], got ", q.sizes());
  Problem pr{};
  pr.B = q.size(0), pr.Hq = q.size(1), pr.L = q.size(2), pr.D = q.size(3);
  PREFIX_KERNELS_CHECK(k.dim() == 4 && k.size(0) == pr.B && k.size(3) == pr.D && v.sizes() == k.sizes(),
                       "k and v must be [B, Hkv, S, D], got ", k.sizes(), " and ", v.sizes());
  pr.Hkv = k.size(1), pr.S = k.size(2);
  PREFIX_KERNELS_CHECK(pr.Hkv > 0 && pr.Hq % pr.Hkv == 0, "Hq must be a multiple of Hkv");
  pr.group = pr.Hq / pr.Hkv;

  PREFIX_KERNELS_CHECK(prefix_v.sizes() == prefix_k.sizes(), "prefix_v must have the shape of prefix_k");
  if (prefix_index.has_value()) {
    PREFIX_KERNELS_CHECK(prefix_k.dim() == 4 && prefix_k.size(0) >= 1 && prefix_k.size(1) == pr.Hkv &&
                             prefix_k.size(3) == pr.D,
                         "prefix_k must be [T, Hkv, P, D] with prefix_index, got ", prefix_k.sizes());
    pr.T = prefix_k.size(0), pr.P = prefix_k.size(2);
    const at::Tensor& idx = *prefix_index;
    // Packed sequences choose a prefix each: [n] for cu_seqlens [n + 1].
    const int64_t rows = cu_seqlens.has_value() ? cu_seqlens->numel() - 1 : pr.B;
    PREFIX_KERNELS_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == rows,
                         "prefix_index must be int64 [B] ([n] with cu_seqlens [n + 1])");
    detail::check_on_q_device(idx, q, "prefix_index");
  } else {
    PREFIX_KERNELS_CHECK(prefix_k.dim() == 3 && prefix_k.size(0) == pr.Hkv && prefix_k.size(2) == pr.D,
                         "prefix_k must be [Hkv, P, D], got ", prefix_k.sizes());
    pr.T = 1, pr.P = prefix_k.size(1);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& kpm = *key_padding_mask;
    PREFIX_KERNELS_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == pr.B &&
                             kpm.size(1) == pr.S,
                         "key_padding_mask must be bool [B, S]");
    detail::check_on_q_device(kpm, q, "key_padding_mask");
  }
  PREFIX_KERNELS_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must lie in [0, 1)");
  pr.causal = causal;
  pr.scale = static_cast<float>(scale);
  pr.dropout_p = static_cast<float>(dropout_p);
  pr.seed = static_cast<uint64_t>(seed);
  return pr;
}

// The inputs only {cpu,cuda}_bwd has, after check_inputs.
inline void check_backward_inputs(const Problem& pr, const at::Tensor& q, const at::Tensor& grad_out,
                                  const at::Tensor& out, const at::Tensor& lse) {
  detail::check_like_q(grad_out, q, "grad_out");
  detail::check_like_q(out, q, "out");
  PREFIX_KERNELS_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                       "grad_out and out must have the shape of q");
  PREFIX_KERNELS_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == pr.B &&
                           lse.size(1) == pr.Hq && lse.size(2) == pr.L,
                       "lse must be float32 [B, Hq, L]");
  detail::check_on_q_device(lse, q, "lse");
}

// The optional features' shapes (docs/op.md; window 0 and softcap 0 mean off), after check_inputs. The values
// of cu_seqlens are left to the implementation (reading them would sync a GPU).
inline void check_features(const Problem& pr, const at::Tensor& q, const std::optional<at::Tensor>& key_padding_mask,
                           const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& sinks,
                           int64_t window, double softcap) {
  PREFIX_KERNELS_CHECK(window >= 0, "window must be >= 0 (0 = off)");
  PREFIX_KERNELS_CHECK(softcap >= 0.0 && softcap < std::numeric_limits<double>::infinity(),
                       "softcap must be finite and >= 0 (0 = off)");
  if (sinks.has_value()) {
    const at::ScalarType t = sinks->scalar_type();
    PREFIX_KERNELS_CHECK((t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble) &&
                             sinks->dim() == 1 && sinks->size(0) == pr.Hq,
                         "sinks must be a float [Hq] tensor");
    detail::check_on_q_device(*sinks, q, "sinks");
  }
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    PREFIX_KERNELS_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 2,
                         "cu_seqlens must be int32 [n + 1]");
    detail::check_on_q_device(cu, q, "cu_seqlens");
    PREFIX_KERNELS_CHECK(pr.B == 1 && pr.L == pr.S && !key_padding_mask.has_value(),
                         "cu_seqlens needs B = 1, L = S and no key_padding_mask");
  }
}

// For an implementation without the op's optional features (docs/op.md; window 0 and softcap 0 mean off):
// prefix_kernels.ops passes such a backend over for calls that use them, so this only guards direct calls.
inline void refuse_features(const char* backend, const std::optional<at::Tensor>& cu_seqlens,
                            const std::optional<at::Tensor>& sinks, int64_t window, double softcap) {
  PREFIX_KERNELS_CHECK(!cu_seqlens.has_value(), "the ", backend, " backend does not implement packed sequences (cu_seqlens)");
  PREFIX_KERNELS_CHECK(!sinks.has_value(), "the ", backend, " backend does not implement attention sinks (sinks)");
  PREFIX_KERNELS_CHECK(window == 0, "the ", backend, " backend does not implement sliding windows (window)");
  PREFIX_KERNELS_CHECK(softcap == 0.0, "the ", backend, " backend does not implement logit soft-capping (softcap)");
}

// The bwd ops' output_mask: which gradients to compute. One not wanted is returned as an empty tensor [0].
struct Wanted {
  bool dq, dkdv, dprefix;  // dq; dk and dv; dprefix_k and dprefix_v
  explicit Wanted(std::array<bool, 3> mask) : dq(mask[0]), dkdv(mask[1]), dprefix(mask[2]) {}
  bool any() const { return dq || dkdv || dprefix; }
};

// `empty_like(like)` (the layout of `like`) when wanted, else the empty [0] the op returns instead.
inline at::Tensor gradient_like(const at::Tensor& like, bool wanted) {
  return wanted ? at::empty_like(like) : at::empty({0}, like.options());
}

}  // namespace prefix_kernels
