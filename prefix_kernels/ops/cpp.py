"""The C++ backends (`cpu`, `cuda`), built by setup.py as the extension `prefix_kernels._C`.

`_C` registers three operators in the `prefix_kernels` namespace (schemas in csrc/ops.cpp):

- `cpp_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed)`
  -> `(out, lse)`, lse fp32 `[B, Hq, L]` (+inf for a row with no visible key);
- `cpp_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, ...)` -> `(dq, dk, dv, dprefix_k, dprefix_v)`;
- `cpp_dropout_mask(B, Hq, L, P, S, dropout_p, seed)` -> bool `[B, Hq, L, P + S]` (True = kept), the mask the
  kernels draw (Triton's Philox, csrc/philox.h), for tests.

This module gives them fake (meta) implementations and autograd, and wraps them as a backend.
"""

from __future__ import annotations

import functools

import torch

from .dropout import draw_seed

BUILD_HINT = (
    "build the C++ extension: pip install --no-build-isolation -e . "
    "(needs a C++ compiler; the cuda backend also needs a CUDA build of torch and CUDA_HOME)"
)

_OPS = ("prefix_kernels::cpp_fwd", "prefix_kernels::cpp_bwd", "prefix_kernels::cpp_dropout_mask")


@functools.lru_cache(maxsize=None)
def _load_error() -> str | None:
    try:
        from prefix_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"the C++ extension prefix_kernels._C is not built ({exc}); {BUILD_HINT}"
    _register_python_side()
    return None


def unavailable_reason(backend: str) -> str | None:
    """None if the `cpu` / `cuda` kernels can run here, else why not."""
    error = _load_error()
    if error is not None:
        return error
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("prefix_kernels::cpp_fwd", "CUDA"):
            return ("prefix_kernels._C was built without CUDA kernels (rebuild with a CUDA build of torch and "
                    f"CUDA_HOME set); {BUILD_HINT}")
        return None
    if backend == "cpu":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("prefix_kernels::cpp_fwd", "CPU"):
            return f"prefix_kernels._C has no CPU kernels; {BUILD_HINT}"
        return None
    raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")


def _require_built(backend: str = "cpu") -> None:
    reason = _load_error()
    if reason is not None:
        raise RuntimeError(reason)


# ---- fake implementations and autograd ----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _register_python_side() -> None:
    """Fake kernels (for torch.compile / meta tensors) and autograd of the C++ ops; runs once, after loading _C."""

    @torch.library.register_fake("prefix_kernels::cpp_fwd")
    def _cpp_fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed):
        B, Hq, L, D = q.shape
        out = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
        return out, lse

    @torch.library.register_fake("prefix_kernels::cpp_bwd")
    def _cpp_bwd_fake(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, causal,
                      scale, dropout_p, seed):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, prefix_k, prefix_v))

    @torch.library.register_fake("prefix_kernels::cpp_dropout_mask")
    def _cpp_dropout_mask_fake(B, Hq, L, P, S, dropout_p, seed):
        return torch.empty((B, Hq, L, P + S), dtype=torch.bool)

    def setup_context(ctx, inputs, output):
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed

    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dpk, dpv = torch.ops.prefix_kernels.cpp_bwd(
            grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
            ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed,
        )
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None

    torch.library.register_autograd("prefix_kernels::cpp_fwd", backward, setup_context=setup_context)


# ---- the backend --------------------------------------------------------------------------------------------


def cpp_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    prefix_index: torch.Tensor | None,
    deterministic: bool = True,
) -> torch.Tensor:
    """The `cpu` / `cuda` backend (inputs already validated by `prefix_attention`). Returns `out`.

    `deterministic` is accepted for the common backend signature; the CPU kernels are always deterministic
    (the prefix gradients are reduced in a fixed order, independent of the thread count).
    """
    _require_built()
    seed = draw_seed(dropout_p)
    out, _lse = torch.ops.prefix_kernels.cpp_fwd(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, bool(causal), float(scale), float(dropout_p),
        seed,
    )
    return out


def cpp_dropout_mask(B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, seed: int) -> torch.Tensor:
    """Bool `[B, Hq, L, P + S]` (True = kept): the dropout mask the C++ kernels draw for `seed` (for tests)."""
    _require_built()
    return torch.ops.prefix_kernels.cpp_dropout_mask(B, Hq, L, P, S, float(dropout_p), int(seed))


def cpp_forward_with_lse(q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask=None, scale=None,
                         dropout_p=0.0, prefix_index=None, seed=0):
    """`(out, lse)` of the raw forward op, with an explicit dropout seed (for tests and benchmarks)."""
    _require_built()
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.ops.prefix_kernels.cpp_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                                            bool(causal), scale, float(dropout_p), int(seed))
