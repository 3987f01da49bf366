"""The op's one schema, registered with torch.library for every backend at import (docs/op.md).

Each backend NAME gets `prefix_kernels::NAME_fwd` and `prefix_kernels::NAME_bwd` with the schemas below, one
fake (meta) kernel for all forwards and one for all backwards (both check shapes and dtypes), and one autograd
formula: the forward saves its inputs, `out` and `lse`, and the backward asks the same backend's `_bwd` op
only for the gradients autograd needs (`ctx.needs_input_grad`). The implementations are registered by the
backends themselves: `triton/launch.py`, the C++ extension `prefix_kernels.ops._C` (`cpu`, `cuda`, which
defines no schema of its own), and `reference.py` (here). The reference forward is the one exception to the
shared fake and autograd: it is registered as a composite, so autograd sees the eager torch ops it is made of
(see reference.py: that is what makes it the baseline).
"""

from __future__ import annotations

import torch

from .validation import validate

NAMESPACE = "prefix_kernels"
BACKEND_NAMES = ("triton", "cuda", "cpu", "reference")

FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, "
    "Tensor? prefix_index, Tensor? cu_seqlens, Tensor? sinks, bool causal, int window, float softcap, float scale, "
    "float dropout_p, int seed, bool deterministic) "
    "-> (Tensor out, Tensor lse)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor out, Tensor lse, "
    "Tensor? key_padding_mask, Tensor? prefix_index, Tensor? cu_seqlens, Tensor? sinks, bool causal, int window, "
    "float softcap, float scale, float dropout_p, int seed, bool deterministic, bool[3] output_mask) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)"
)
# Positions in the forward's arguments (the autograd formula returns one gradient per argument).
_N_FWD_ARGS = 16
_SINKS = 8


def op_names(backend: str) -> tuple[str, str]:
    return f"{NAMESPACE}::{backend}_fwd", f"{NAMESPACE}::{backend}_bwd"


def _validate(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal, window,
              softcap, scale, dropout_p):
    validate(q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
             dropout_p=dropout_p, prefix_index=prefix_index, window=window or None, softcap=softcap or None,
             sinks=sinks, cu_seqlens=cu_seqlens, check_index_values=False, check_cu_seqlens=False)


def _fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal, window,
              softcap, scale, dropout_p, seed, deterministic):
    _validate(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal, window,
              softcap, scale, dropout_p)
    B, Hq, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, cu_seqlens, sinks,
              causal, window, softcap, scale, dropout_p, seed, deterministic, output_mask):
    _validate(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal, window,
              softcap, scale, dropout_p)
    for name, t, dtype in (("grad_out", grad_out, q.dtype), ("out", out, q.dtype), ("lse", lse, torch.float32)):
        expected = q.shape if name != "lse" else q.shape[:3]
        if t.shape != expected or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {list(expected)}, got {t.dtype} {list(t.shape)}")
    return _gradients_like((q, k, v, prefix_k, prefix_v), output_mask)


def _gradients_like(inputs, output_mask):
    wants = (output_mask[0], output_mask[1], output_mask[1], output_mask[2], output_mask[2])
    return tuple(torch.empty_like(t) if w else t.new_empty((0,)) for t, w in zip(inputs, wants))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, *options) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, cu_seqlens, sinks)
    ctx.options = tuple(options)  # causal, window, softcap, scale, dropout_p, seed, deterministic


def sinks_grad(sinks: torch.Tensor, grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks from the forward's lse: a sink's probability is exp(sink - lse) and it carries no value,
    so its score gradient is -p_sink * rowsum(dO * O), summed over the rows and queries of each head."""
    delta = (grad_out.float() * out.float()).sum(-1)
    p_sink = torch.exp(sinks.float().view(1, -1, 1) - lse)
    return (-(p_sink * delta)).sum(dim=(0, 2)).to(sinks.dtype)


def _autograd_for(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, cu_seqlens, sinks = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * _N_FWD_ARGS
        if grad_out is None:
            return tuple(grads)
        output_mask = [need[0], need[1] or need[2], need[3] or need[4]]
        if any(output_mask):
            five = bwd_op(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
                          cu_seqlens, sinks, *ctx.options, output_mask)
            grads[:5] = (g if n else None for g, n in zip(five, need[:5]))
        if need[_SINKS]:
            grads[_SINKS] = sinks_grad(sinks, grad_out, out, lse)
        return tuple(grads)

    return backward


def _define(backend: str) -> None:
    fwd, bwd = op_names(backend)
    torch.library.define(fwd, FWD_SCHEMA)
    torch.library.define(bwd, BWD_SCHEMA)
    torch.library.register_fake(bwd)(_bwd_fake)
    if backend == "reference":
        return
    torch.library.register_fake(fwd)(_fwd_fake)
    bwd_op = getattr(getattr(torch.ops, NAMESPACE), f"{backend}_bwd").default
    torch.library.register_autograd(fwd, _autograd_for(bwd_op), setup_context=_setup_context)


def _register_reference() -> None:
    from .reference import reference_bwd, reference_fwd

    fwd, bwd = op_names("reference")
    torch.library.impl(fwd, "CompositeImplicitAutograd")(reference_fwd)
    torch.library.register_kernel(bwd, ("cpu", "cuda"))(reference_bwd)


for _backend in BACKEND_NAMES:
    _define(_backend)
_register_reference()
