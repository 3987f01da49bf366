"""The triton backend's implementations of `triton_fwd` / `triton_bwd` (schema, fakes and autograd: library.py).

Registered for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1, where the same launches run in
Triton's interpreter for the tests. To torch.compile the op is one opaque custom op (its fake gives shapes
and strides), so a compiled model keeps the fused kernels without a graph break.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton

from ..backends import cuda_arch, triton_bwd_mode, triton_fwd_mode
from ..library import op_names
from . import configs, interpreting
from .configs import DECODE_MERGE_TILE, DROPOUT_MASK_TILE, PREPROCESS_TILE, decode_tile, plain_tile
from .kernels import (
    prefix_attention_bwd_dkdv,
    prefix_attention_bwd_dq,
    prefix_attention_bwd_dprefix,
    prefix_attention_bwd_preprocess,
    prefix_attention_dropout_mask,
    prefix_attention_fwd,
)
from .kernels_bwd_fused import prefix_attention_bwd_fused
from .kernels_decode import prefix_attention_fwd_decode, prefix_attention_fwd_decode_merge

LOG2E = math.log2(math.e)  # the kernels work in exp2: scores are pre-multiplied by scale * log2(e)

# Upper bound on the row chunks of the deterministic prefix reduction: its fp32 partial buffers are
# [n_splits, T, Hkv, P, D], so memory stays independent of the batch size.
MAX_PREFIX_SPLITS = 32
# The decode path's split of the keys (docs/kernels.md "Decode: few queries per KV head"): a split gets at least
# MIN_DECODE_SPLIT_BLOCKS key blocks, and there are at most MAX_DECODE_SPLITS. DECODE_SPLITS_ENV forces a count
# (tests; any device).
MIN_DECODE_SPLIT_BLOCKS = 4
MAX_DECODE_SPLITS = 64
DECODE_SPLITS_ENV = "PREFIX_KERNELS_DECODE_SPLITS"


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _prefix_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    # A single [Hkv, P, D] prefix reads as T = 1 with a zero prefix stride.
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


# The kernels add the head (and prefix) part of an offset in int32: the batch row and the row-times-stride parts are
# int64 (docs/kernels.md). Casting the head to int64 as well pushes tiles at 255 registers into spills, and the
# head offsets of the layouts callers use are small (a [B, L, H, D] buffer seen as [B, H, L, D] has head stride D),
# so a tensor whose head offsets reach 2**31 elements is refused before any launch instead.
INT32_OFFSETS = 2**31


def check_head_offsets(tensors: dict, prefixes: dict) -> None:
    """ValueError naming the tensor if (heads - 1) x head stride of a [B, H, L, D] tensor, or the largest
    (prefix, head) offset of a [T, Hkv, P, D] / [Hkv, P, D] prefix, reaches 2**31 elements."""
    for name, t in tensors.items():
        if (t.shape[1] - 1) * t.stride(1) >= INT32_OFFSETS:
            raise ValueError(
                f"the triton backend adds head offsets in int32: {name} has {t.shape[1]} heads {t.stride(1)} "
                f"elements apart, past 2**31; pass it in the [B, L, H, D] layout (a transpose(1, 2) view of a "
                f"contiguous [B, L, H, D] tensor, head stride D) or use another backend")
    for name, t in prefixes.items():
        lead = sum((size - 1) * stride for size, stride in zip(t.shape[:-2], t.stride()[:-2]))
        if lead >= INT32_OFFSETS:
            raise ValueError(f"the triton backend adds prefix offsets in int32: {name} {tuple(t.shape)} with "
                             f"strides {t.stride()} reaches 2**31 elements before its last prefix's rows")


def _mask_args(key_padding_mask: Optional[torch.Tensor], like: torch.Tensor):
    if key_padding_mask is None:
        return like, (0, 0), False
    return key_padding_mask.view(torch.uint8), _strides(key_padding_mask), True


def _torch_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32: `torch.backends.cuda.matmul.fp32_precision` (torch >= 2.9;
    "none" inherits the global setting, as torch does) or, when that says nothing, the legacy `allow_tf32`
    (= `torch.get_float32_matmul_precision() != "highest"`)."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
    except RuntimeError:
        precision = None
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read a flag set through a mix of the legacy and the new API
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' `tl.dot` input precision. fp16/bf16 dots ignore it ("tf32", the default). fp32 inputs
    follow PyTorch's TF32 setting ("tf32" when it allows TF32 matmuls, else "ieee": exact fp32 products, the
    slow path, see docs/kernels.md); the interpreter always computes "ieee"."""
    if dtype != torch.float32:
        return "tf32"
    if interpreting():
        return "ieee"
    return "tf32" if _torch_allows_tf32() else "ieee"


def _common_constexprs(q: torch.Tensor, Hkv: int, causal: bool, dropout_p: float) -> dict:
    D = q.shape[-1]
    return dict(GROUP=q.shape[1] // Hkv, D=D, D_PAD=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype))


def launch_with_tile(kernel, grid, tile: tuple[int, int, int, int], *args, **kwargs) -> None:
    """Launch an autotuned kernel's underlying JIT function at `tile` (BLOCK_M, BLOCK_N, num_warps, num_stages),
    doing what the autotuner does for a config: its pre-hook (the forward's descriptor blocks) first."""
    block_m, block_n, num_warps, num_stages = tile
    configs.set_descriptor_blocks({**dict(zip(kernel.fn.arg_names, args)), **kwargs, "BLOCK_M": block_m,
                                   "BLOCK_N": block_n})
    kernel.fn[grid](*args, **kwargs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _launch(kernel, grid, *args, **kwargs) -> None:
    # Under the interpreter with the shipped tiles on (configs.shipped_tiles), an autotuned kernel runs with
    # the first shipped tile of its table instead of the interpreter's small one.
    tile = configs.interpreter_shipped_tile(kernel, kwargs)
    if tile is not None:
        launch_with_tile(kernel, grid, tile, *args, **kwargs)
        return
    kernel[grid](*args, **kwargs)


def _buckets(L: int, S: int, P: int) -> tuple[int, int, int]:
    """(L_BUCKET, S_BUCKET, P_BUCKET): the autotuner's size keys, powers of two."""
    return triton.next_power_of_2(max(L, 1)), triton.next_power_of_2(max(S, 1)), triton.next_power_of_2(max(P, 1))


def _feature_args(q: torch.Tensor, S: int, cu_seqlens: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
                  window: int, softcap: float) -> tuple[tuple, dict]:
    """(CU_SEQLENS, SINK_LOGITS), n_seqs, window, softcap as the kernels take them, and their constexpr flags.
    Unused pointers are `q` (never read)."""
    packed = cu_seqlens is not None
    if window >= S:
        # i' - j < S for every query: the window hides nothing (and the kernels' int32 bounds never overflow).
        window = 0
    pointers = (cu_seqlens if packed else q,
                q if sinks is None else sinks.to(torch.float32).contiguous())  # [Hq]: a copy at most
    flags = dict(WINDOW=window != 0, SOFTCAP=softcap != 0.0, SINKS=sinks is not None, PACKED=packed)
    return (*pointers, cu_seqlens.shape[0] - 1 if packed else 1, int(window), float(softcap)), flags


def _grid(n: int, block: int, rows: int, flags: dict, n_seqs: int) -> tuple[int, int]:
    """(rows, blocks): the B * H rows on axis 0 (up to 2**31 - 1 programs; axes 1 and 2 stop at 65535), the
    blocks of n on axis 1. Packed: L // block + n programs (kernels.py, `_packed_sequence`) cover every
    sequence's blocks."""
    return (rows, n // block + n_seqs if flags["PACKED"] else triton.cdiv(n, block))


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether TMA can read `t` as it is: a 16-byte aligned base, a contiguous last dim, 16-byte multiples as the
    other strides (a [B, L, H, D] tensor in 16-bit types: D a multiple of 8)."""
    size = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(stride * size % 16 == 0 for stride in t.stride()[:-1]))


def _tma_descriptors(q, k, v, prefix_k, prefix_v, out, d_pad: int) -> Optional[dict]:
    """Q, K, V, PK, PV and OUT as the TMA forward takes them: [B or T, heads, rows, D] tensor descriptors (blocks set
    per config by configs.set_descriptor_blocks), or None if a tensor breaks TMA's layout rules. A [Hkv, P, D]
    prefix reads as T = 1; with P = 0 the prefix loops never run and K's descriptors stand in for the prefix's."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    prefixes = (prefix_k, prefix_v) if prefix_k.shape[-2] > 0 else (k, v)
    tensors = dict(Q=q, K=k, V=v, PK=prefixes[0], PV=prefixes[1], OUT=out)
    tensors = {name: t.unsqueeze(0) if t.dim() == 3 else t for name, t in tensors.items()}
    if not all(_tma_ready(t) for t in tensors.values()):
        return None
    # The blocks here are placeholders of a valid shape: the config's pre-hook sets the real ones.
    return {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, d_pad])
            for name, t in tensors.items()}


def triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], sinks: Optional[torch.Tensor], causal: bool, window: int, softcap: float,
    scale: float, dropout_p: float, seed: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    tma_mode = triton_fwd_mode(cuda_arch(q.device)) == "tma"  # before any launch: a bad mode raises here
    out = torch.empty_like(q)
    decode = takes_decode_path(L, Hq // Hkv, dropout_p, cu_seqlens)
    # The decode kernel's sequence-side head offsets are int64 (a long KV cache): only its prefixes are checked.
    check_head_offsets({} if decode else {"q": q, "k": k, "v": v, "the output (laid out as q)": out},
                       {"prefix_k": prefix_k, "prefix_v": prefix_v})
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    kpm, kpm_strides, has_kpm = _mask_args(key_padding_mask, q)
    pidx = q if prefix_index is None else prefix_index
    consts = _common_constexprs(q, Hkv, causal, dropout_p)
    (cu, sink_logits, n_seqs, window, softcap), flags = _feature_args(q, S, cu_seqlens, sinks, window, softcap)
    if decode:
        _decode_fwd(q, k, v, prefix_k, prefix_v, kpm, kpm_strides, has_kpm, pidx, prefix_index is not None,
                    sink_logits, out, lse, window, softcap, scale * LOG2E, flags, consts)
        return out, lse

    def grid(meta):
        return _grid(L, meta["BLOCK_M"], B * Hq, flags, n_seqs)

    # TMA takes every call but packed sequences (their sequences end inside a row, where the copy engine's bounds
    # are not), head dims past configs.TMA_MAX_D_PAD and tensors it cannot address; those run on pointers.
    descriptors = None
    if tma_mode and not flags["PACKED"] and consts["D_PAD"] <= configs.TMA_MAX_D_PAD:
        descriptors = _tma_descriptors(q, k, v, prefix_k, prefix_v, out, consts["D_PAD"])
    tiles = descriptors or dict(Q=q, K=k, V=v, PK=prefix_k, PV=prefix_v, OUT=out)
    _launch(
        prefix_attention_fwd, grid,
        tiles["Q"], tiles["K"], tiles["V"], tiles["PK"], tiles["PV"], kpm, pidx, cu, sink_logits, tiles["OUT"], lse,
        *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_strides(out), *kpm_strides,
        Hq, L, S, P, n_seqs, window, softcap, scale * LOG2E, dropout_p, seed, *_buckets(L, S, P),
        HAS_KPM=has_kpm, MULTI_PREFIX=prefix_index is not None, TMA=descriptors is not None, **flags, **consts,
    )
    return out, lse


def takes_decode_path(L: int, group: int, dropout_p: float, cu_seqlens: Optional[torch.Tensor]) -> bool:
    """Few query rows per KV head (the GROUP query heads times L queries), no dropout, not packed: the decode
    kernels (kernels_decode.py) instead of prefix_attention_fwd."""
    return group * L <= configs.DECODE_MAX_ROWS and dropout_p == 0.0 and cu_seqlens is None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(device: torch.device, programs: int, key_blocks: int) -> int:
    """How many programs share the key blocks of a decode tile block: enough to fill about one wave of the GPU's
    SMs with `programs` tile blocks, each split at least MIN_DECODE_SPLIT_BLOCKS blocks long; 1 when the tile
    blocks fill the GPU. DECODE_SPLITS_ENV forces the count (it may exceed the blocks: the extra splits see no
    key); under the interpreter (and off CUDA) up to 3, one block each, so that tests merge splits."""
    forced = os.environ.get(DECODE_SPLITS_ENV, "")
    if forced:
        return max(1, int(forced))
    if interpreting() or device.type != "cuda":
        return max(1, min(3, key_blocks))
    wanted = triton.cdiv(_sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                         programs)
    return max(1, min(wanted, key_blocks // MIN_DECODE_SPLIT_BLOCKS, MAX_DECODE_SPLITS))


def _decode_fwd(q, k, v, prefix_k, prefix_v, kpm, kpm_strides, has_kpm, pidx, multi, sink_logits, out, lse, window,
                softcap, scale_log2, flags, consts) -> None:
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    group = consts["GROUP"]
    block_m, block_n, num_warps, num_stages = decode_tile(consts["D_PAD"], group * L)
    tile_blocks = triton.cdiv(group * L, block_m)
    # The keys a tile block may see: the prefix, and the sequence up to a window's reach.
    seen = min(S, window + L - 1) if window else S
    n_splits = decode_splits(q.device, B * Hkv * tile_blocks, triton.cdiv(P, block_n) + triton.cdiv(seen, block_n))
    split = n_splits > 1
    ws_o = ws_lse = lse  # not read without SPLIT
    if split:
        ws_o = torch.empty((B * Hq * L, n_splits, D), dtype=torch.float32, device=q.device)
        ws_lse = torch.empty((B * Hq * L, n_splits), dtype=torch.float32, device=q.device)
    _launch(
        prefix_attention_fwd_decode, (B * Hkv, tile_blocks, n_splits),
        q, k, v, prefix_k, prefix_v, kpm, pidx, sink_logits, out, lse, ws_o, ws_lse,
        *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_strides(out), *kpm_strides,
        Hq, Hkv, L, S, P, n_splits, window, softcap, scale_log2,
        GROUP=group, D=D, D_PAD=consts["D_PAD"], CAUSAL=consts["CAUSAL"], HAS_KPM=has_kpm, MULTI_PREFIX=multi,
        WINDOW=flags["WINDOW"], SOFTCAP=flags["SOFTCAP"], SINKS=flags["SINKS"], SPLIT=split,
        DOT_PRECISION=consts["DOT_PRECISION"], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        merge_block, _, merge_warps, merge_stages = plain_tile(DECODE_MERGE_TILE)
        _launch(
            prefix_attention_fwd_decode_merge, (triton.cdiv(B * Hq * L, merge_block),),
            ws_o, ws_lse, out, lse, *_strides(out), Hq, L, B * Hq * L, n_splits,
            D=D, D_PAD=consts["D_PAD"], BLOCK_M=merge_block, num_warps=merge_warps, num_stages=merge_stages,
        )


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


def triton_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], sinks: Optional[torch.Tensor], causal: bool, window: int, softcap: float,
    scale: float, dropout_p: float, seed: int, deterministic: bool, output_mask: list[bool],
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
    buckets = _buckets(L, S, P)
    # The sinks reach the backward through lse only (docs/op.md): the kernels below take no SINKS.
    (cu, _, n_seqs, window, softcap), flags = _feature_args(q, S, cu_seqlens, None, window, softcap)
    flags.pop("SINKS")
    mode = triton_bwd_mode(deterministic)  # before any launch: a bad or conflicting mode raises here
    check_head_offsets({"q": q, "k": k, "v": v, "out": out, "grad_out": grad_out},
                       {"prefix_k": prefix_k, "prefix_v": prefix_v})

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    pre_block, _, pre_warps, pre_stages = plain_tile(PREPROCESS_TILE)
    _launch(
        prefix_attention_bwd_preprocess, (B * Hq, triton.cdiv(L, pre_block)),
        out, grad_out, delta, *_strides(out), *_strides(grad_out), Hq, L,
        D=D, D_PAD=consts["D_PAD"], BLOCK_M=pre_block, num_warps=pre_warps, num_stages=pre_stages,
    )

    want_dq, want_dkdv, want_dprefix = (bool(w) for w in output_mask)
    atomic_dq = mode == "atomic" and want_dq
    dq = torch.empty_like(q) if want_dq else q.new_empty((0,))
    # The atomic backward's dq comes out of bwd_dkdv (and bwd_dprefix): dK, dV are computed even when unwanted.
    dk = torch.empty_like(k) if want_dkdv or atomic_dq else k.new_empty((0,))
    dv = torch.empty_like(v) if want_dkdv or atomic_dq else v.new_empty((0,))
    # The fp32 sum the atomic backward adds dq into; a one-element placeholder otherwise (never written; the
    # autotuner saves and restores it around its trial runs, as it does a real one).
    dq_acc = q.new_zeros((B, Hq, L, D) if atomic_dq else (1,), dtype=torch.float32)
    sizes = (Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, buckets)
    seq_args = (q, k, v, prefix_k, prefix_v, kpm, kpm_strides, has_kpm, pidx, cu, grad_out, lse, delta)
    if mode == "fused":
        _fused_seq_gradients(*seq_args, dq, dk, dv, want_dq, want_dkdv and S > 0, B, multi, sizes, flags, consts)
    else:
        _split_seq_gradients(*seq_args, dq, dk, dv, want_dq and not atomic_dq, (want_dkdv or atomic_dq) and S > 0,
                             dq_acc, atomic_dq, B, multi, sizes, flags, consts)

    dprefix = (prefix_k.new_empty((0,)), prefix_v.new_empty((0,)))
    if want_dprefix or (atomic_dq and P > 0):
        if multi and cu_seqlens is not None:
            pidx = _prefix_of_each_row(prefix_index, cu_seqlens, L)
        prefix_consts = dict(consts, SOFTCAP=flags["SOFTCAP"], PACKED=flags["PACKED"] and multi)
        grads = _prefix_gradients(q, prefix_k, prefix_v, pidx, grad_out, lse, delta, multi, T, P, S, softcap,
                                  scale_log2, dropout_p, seed, buckets, deterministic, dq_acc, atomic_dq,
                                  prefix_consts)
        if want_dprefix:
            dprefix = grads
    if atomic_dq:
        dq.copy_(dq_acc)  # in q's dtype and layout
    return (dq, dk if want_dkdv else k.new_empty((0,)), dv if want_dkdv else v.new_empty((0,)), *dprefix)


def _split_seq_gradients(q, k, v, prefix_k, prefix_v, kpm, kpm_strides, has_kpm, pidx, cu, grad_out, lse, delta,
                         dq, dk, dv, dq_on, dkdv_on, dq_acc, atomic_dq, B, multi, sizes, flags, consts) -> None:
    """bwd_dq (dq_on) and bwd_dkdv (dkdv_on); with atomic_dq, bwd_dkdv also adds dq into dq_acc."""
    Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, buckets = sizes
    if dq_on:
        _launch(
            prefix_attention_bwd_dq, lambda meta: _grid(L, meta["BLOCK_M"], B * Hq, flags, n_seqs),
            q, k, v, prefix_k, prefix_v, kpm, pidx, cu, grad_out, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *_strides(grad_out), *_strides(dq), *kpm_strides,
            Hq, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, *buckets, MULTI_PREFIX=multi,
            HAS_KPM=has_kpm, **flags, **consts,
        )
    if dkdv_on:
        _launch(
            prefix_attention_bwd_dkdv, lambda meta: _grid(S, meta["BLOCK_N"], B * Hkv, flags, n_seqs),
            q, k, v, kpm, cu, grad_out, lse, delta, dk, dv, dq_acc,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            *kpm_strides,
            Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, *buckets, HAS_KPM=has_kpm,
            ATOMIC_DQ=atomic_dq, **flags, **consts,
        )


def _fused_seq_gradients(q, k, v, prefix_k, prefix_v, kpm, kpm_strides, has_kpm, pidx, cu, grad_out, lse, delta,
                         dq, dk, dv, dq_on, dkdv_on, B, multi, sizes, flags, consts) -> None:
    Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, buckets = sizes
    if not (dq_on or dkdv_on):
        return

    def grid(meta):
        # Program i of a (row, KV head) owns key block i and query block i.
        blocks = max(_grid(L, meta["BLOCK_M"], 1, flags, n_seqs)[1] if dq_on else 0,
                     _grid(S, meta["BLOCK_N"], 1, flags, n_seqs)[1] if dkdv_on else 0)
        return (B * Hkv, blocks)

    # A part that does not run gets its input as a pointer (never written): an empty [0] tensor has no strides.
    dq_arg, dk_arg, dv_arg = (dq if dq_on else q), (dk if dkdv_on else k), (dv if dkdv_on else v)
    _launch(
        prefix_attention_bwd_fused, grid,
        q, k, v, prefix_k, prefix_v, kpm, pidx, cu, grad_out, lse, delta, dq_arg, dk_arg, dv_arg,
        *_strides(q), *_strides(k), *_strides(v), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *_strides(grad_out), *_strides(dq_arg), *_strides(dk_arg), *_strides(dv_arg), *kpm_strides,
        Hq, Hkv, L, S, P, n_seqs, window, softcap, scale_log2, dropout_p, seed, *buckets, MULTI_PREFIX=multi,
        HAS_KPM=has_kpm, DQ_ON=dq_on, DKDV_ON=dkdv_on, **flags, **consts,
    )


def _prefix_of_each_row(prefix_index: torch.Tensor, cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """int64 [L]: the prefix of each query row of a packed row (its sequence's), found on the device (no sync).
    The prefix reduction walks the packed row in query blocks that may span sequences."""
    rows = torch.arange(L, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens, rows, right=True) - 1  # empty sequences own no row
    return prefix_index[sequence]


def _prefix_gradients(q, prefix_k, prefix_v, pidx, grad_out, lse, delta, multi, T, P, S, softcap, scale_log2,
                      dropout_p, seed, buckets, deterministic, dq_acc, atomic_dq, consts):
    """dPK, dPV; with atomic_dq, bwd_dprefix also adds the prefix keys' share of dq into dq_acc."""
    B, Hq, L, D = q.shape
    Hkv = prefix_k.shape[-3]
    if P == 0:
        return torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    n_splits = _prefix_splits(q, Hkv, P, T, deterministic)
    slots = 1 if not deterministic else n_splits
    alloc = torch.zeros if not deterministic else torch.empty
    dpk_acc = alloc((slots, T, Hkv, P, D), dtype=torch.float32, device=q.device)
    dpv_acc = alloc((slots, T, Hkv, P, D), dtype=torch.float32, device=q.device)
    consts = {name: value for name, value in consts.items() if name != "CAUSAL"}  # every query sees the prefix
    _launch(
        prefix_attention_bwd_dprefix, lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), T * Hkv, n_splits),
        q, prefix_k, prefix_v, pidx, grad_out, lse, delta, dpk_acc, dpv_acc, dq_acc,
        *_strides(q), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v), *_strides(grad_out),
        B, Hq, Hkv, L, S, P, T, n_splits, softcap, scale_log2, dropout_p, seed, *buckets,
        MULTI_PREFIX=multi, ATOMIC=not deterministic, ATOMIC_DQ=atomic_dq, **consts,
    )
    # Summing the chunk slices in index order keeps the reduction deterministic; one slice needs no sum.
    if slots == 1:
        dpk_acc, dpv_acc = dpk_acc[0], dpv_acc[0]
    else:
        dpk_acc, dpv_acc = dpk_acc.sum(0), dpv_acc.sum(0)
    return dpk_acc.to(prefix_k.dtype).reshape(prefix_k.shape), dpv_acc.to(prefix_v.dtype).reshape(prefix_v.shape)


def triton_dropout_mask(B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, seed: int,
                        device: torch.device | str) -> torch.Tensor:
    """Bool [B, Hq, L, P + S], True where the triton kernels keep a probability for this seed."""
    keep = torch.empty((B, Hq, L, P + S), dtype=torch.int8, device=device)
    block_m, block_n, warps, stages = plain_tile(DROPOUT_MASK_TILE)
    grid = (B * Hq, triton.cdiv(L, block_m), triton.cdiv(P + S, block_n))
    prefix_attention_dropout_mask[grid](keep, L, P, S, dropout_p, seed, BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=warps, num_stages=stages)
    return keep.bool()


_fwd_name, _bwd_name = op_names("triton")
_devices = ("cuda", "cpu") if interpreting() else ("cuda",)
torch.library.register_kernel(_fwd_name, _devices)(triton_fwd)
torch.library.register_kernel(_bwd_name, _devices)(triton_bwd)
