"""The triton backend as `torch.library` ops: launch glue, fake implementations and autograd.

`triton_op` + `wrap_triton` make the kernels visible to torch.compile, and the same registration runs the
kernels under TRITON_INTERPRET=1 on CPU tensors for the tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from ..dropout import draw_seed
from .configs import DROPOUT_MASK_TILE, PREPROCESS_TILE, interpreting, plain_tile
from .kernels import (
    prefix_attention_bwd_dkdv,
    prefix_attention_bwd_dq,
    prefix_attention_bwd_dprefix,
    prefix_attention_bwd_preprocess,
    prefix_attention_dropout_mask,
    prefix_attention_fwd,
)

LOG2E = math.log2(math.e)  # the kernels work in exp2: scores are pre-multiplied by scale * log2(e)

# Upper bound on the row chunks of the deterministic prefix reduction: its fp32 partial buffers are
# [n_splits, T, Hkv, P, D], so memory stays independent of the batch size.
MAX_PREFIX_SPLITS = 32


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _prefix_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    # A single [Hkv, P, D] prefix reads as T = 1 with a zero prefix stride.
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


def _mask_args(key_padding_mask: Optional[torch.Tensor], like: torch.Tensor):
    if key_padding_mask is None:
        return like, (0, 0), False
    return key_padding_mask.view(torch.uint8), _strides(key_padding_mask), True


def _common_constexprs(q: torch.Tensor, Hkv: int, causal: bool, dropout_p: float) -> dict:
    D = q.shape[-1]
    return dict(GROUP=q.shape[1] // Hkv, D=D, D_PAD=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                DROPOUT=dropout_p > 0.0, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _launch(kernel, grid, *args, **kwargs) -> None:
    # wrap_triton makes the launch visible to torch.compile (under TRITON_INTERPRET=1 it hands back the plain
    # kernel, so compiling a model is a GPU-only feature; eager runs everywhere).
    wrap_triton(kernel)[grid](*args, **kwargs)


def _buckets(L: int, S: int) -> tuple[int, int]:
    return triton.next_power_of_2(L), triton.next_power_of_2(max(S, 1))


@triton_op("prefix_kernels::triton_fwd", mutates_args=())
def triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
    causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    out = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    kpm, kpm_strides, has_kpm = _mask_args(key_padding_mask, q)
    pidx = q if prefix_index is None else prefix_index
    consts = _common_constexprs(q, Hkv, causal, dropout_p)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

    _launch(
        prefix_attention_fwd, grid,
        q, k, v, prefix_k, prefix_v, kpm, pidx, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_strides(out), *kpm_strides,
        Hq, L, S, P, scale * LOG2E, dropout_p, seed, *_buckets(L, S),
        HAS_KPM=has_kpm, MULTI_PREFIX=prefix_index is not None, **consts,
    )
    return out, lse


def _prefix_splits(q: torch.Tensor, Hkv: int, P: int, T: int, deterministic: bool) -> int:
    B, Hq, L, _ = q.shape
    units = B * (Hq // Hkv) * triton.cdiv(L, 16)
    if interpreting() or q.device.type != "cuda":
        return min(units, 3)
    owners = triton.cdiv(P, 64) * T * Hkv
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    wanted = triton.cdiv(2 * sms if deterministic else 4 * sms, owners)
    cap = MAX_PREFIX_SPLITS if deterministic else 4 * MAX_PREFIX_SPLITS
    return max(1, min(wanted, cap, units))


@triton_op("prefix_kernels::triton_bwd", mutates_args=())
def triton_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
    causal: bool, scale: float, dropout_p: float, seed: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    T = prefix_k.shape[0] if prefix_index is not None else 1
    multi = prefix_index is not None
    kpm, kpm_strides, has_kpm = _mask_args(key_padding_mask, q)
    pidx = q if prefix_index is None else prefix_index
    consts = _common_constexprs(q, Hkv, causal, dropout_p)
    scale_log2 = scale * LOG2E
    buckets = _buckets(L, S)

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    pre_block, _, pre_warps, pre_stages = plain_tile(PREPROCESS_TILE)
    _launch(
        prefix_attention_bwd_preprocess, (triton.cdiv(L, pre_block), B * Hq),
        out, grad_out, delta, *_strides(out), *_strides(grad_out), Hq, L,
        D=D, D_PAD=consts["D_PAD"], BLOCK_M=pre_block, num_warps=pre_warps, num_stages=pre_stages,
    )

    dq = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
    _launch(
        prefix_attention_bwd_dq, lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * Hq),
        q, k, v, prefix_k, prefix_v, kpm, pidx, grad_out, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_strides(grad_out), *_strides(dq), *kpm_strides,
        Hq, L, S, P, scale_log2, dropout_p, seed, *buckets, MULTI_PREFIX=multi, HAS_KPM=has_kpm, **consts,
    )

    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=v.device)
    if S > 0:
        _launch(
            prefix_attention_bwd_dkdv, lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv),
            q, k, v, kpm, grad_out, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            *kpm_strides,
            Hq, Hkv, L, S, P, scale_log2, dropout_p, seed, *buckets, HAS_KPM=has_kpm, **consts,
        )

    if P == 0:
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        return dq, dk, dv, dpk, dpv
    n_splits = _prefix_splits(q, Hkv, P, T, deterministic)
    slots = 1 if not deterministic else n_splits
    alloc = torch.zeros if not deterministic else torch.empty
    dpk_acc = alloc((slots, T, Hkv, P, D), dtype=torch.float32, device=q.device)
    dpv_acc = alloc((slots, T, Hkv, P, D), dtype=torch.float32, device=q.device)
    del consts["CAUSAL"]  # every query sees every prefix key
    _launch(
        prefix_attention_bwd_dprefix, lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), T * Hkv, n_splits),
        q, prefix_k, prefix_v, pidx, grad_out, lse, delta, dpk_acc, dpv_acc,
        *_strides(q), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *_strides(grad_out),
        B, Hq, Hkv, L, S, P, T, n_splits, scale_log2, dropout_p, seed, *buckets,
        MULTI_PREFIX=multi, ATOMIC=not deterministic, **consts,
    )
    # Summing the chunk slices in index order keeps the reduction deterministic.
    dpk = dpk_acc.sum(0).to(prefix_k.dtype).reshape(prefix_k.shape)
    dpv = dpv_acc.sum(0).to(prefix_v.dtype).reshape(prefix_v.shape)
    return dq, dk, dv, dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, causal, scale, dropout_p, seed, det = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index)
    ctx.args = (causal, scale, dropout_p, seed, det)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index = ctx.saved_tensors
    grads = torch.ops.prefix_kernels.triton_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse,
                                               key_padding_mask, prefix_index, *ctx.args)
    return (*grads, None, None, None, None, None, None, None)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_prefix_attention(q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask, scale, dropout_p,
                            prefix_index, deterministic):
    seed = draw_seed(dropout_p)
    out, _ = torch.ops.prefix_kernels.triton_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                                                 causal, scale, dropout_p, seed, deterministic)
    return out


def triton_dropout_mask(B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, seed: int,
                        device: torch.device | str) -> torch.Tensor:
    """Bool [B, Hq, L, P + S], True where the triton kernels keep a probability for this seed."""
    keep = torch.empty((B, Hq, L, P + S), dtype=torch.int8, device=device)
    block_m, block_n, warps, stages = plain_tile(DROPOUT_MASK_TILE)
    grid = (triton.cdiv(L, block_m), triton.cdiv(P + S, block_n), B * Hq)
    prefix_attention_dropout_mask[grid](keep, L, P, S, dropout_p, seed, BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=warps, num_stages=stages)
    return keep.bool()
