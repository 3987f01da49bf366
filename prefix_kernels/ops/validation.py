"""Input checks for `prefix_attention`, shared by every backend (the contract: docs/op.md).

Every check runs before any kernel is launched, so a malformed call raises a Python error that names the
argument and the expected shape instead of reading out of bounds on a device.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def validate(
    q, k, v, prefix_k, prefix_v, *, causal, key_padding_mask, scale, dropout_p, prefix_index,
    window=None, softcap=None, sinks=None, cu_seqlens=None,
    check_index_values: bool = True, check_cu_seqlens: bool = True,
) -> None:
    """Raise TypeError / ValueError naming the argument and what was expected. Reads only shapes, dtypes and
    devices, except the values of `prefix_index` and `cu_seqlens` (a device sync on CUDA each), which
    `check_index_values=False` / `check_cu_seqlens=False` leave to a caller that checked them once for many
    calls (the transformers integration, once per forward)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _require_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, Hq, L, D] (4 dims), got {_shape(q)}")
    B, Hq, L, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, Hkv, S, D] (4 dims), got {_shape(t)}")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k must have shape [B={B}, Hkv, S, D={D}], got {_shape(k)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if B == 0 or Hq == 0 or L == 0:
        raise ValueError(f"q must have B, Hq and L >= 1, got {_shape(q)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be between 1 and {MAX_HEAD_DIM}, got D={D}")

    if cu_seqlens is not None:
        validate_cu_seqlens(cu_seqlens, q, k, key_padding_mask, check_cu_seqlens)
    if prefix_index is None:
        expected = f"[Hkv={Hkv}, P, D={D}]"
        if prefix_k.dim() != 3 or prefix_k.shape[0] != Hkv or prefix_k.shape[2] != D:
            raise ValueError(f"prefix_k must have shape {expected}, got {_shape(prefix_k)}"
                             + (" (a 4-dim prefix needs prefix_index)" if prefix_k.dim() == 4 else ""))
        T = 1
    else:
        _require_tensor("prefix_index", prefix_index)
        expected = f"[T, Hkv={Hkv}, P, D={D}]"
        if prefix_k.dim() != 4 or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
            raise ValueError(f"prefix_k must have shape {expected} when prefix_index is given, got {_shape(prefix_k)}")
        T = prefix_k.shape[0]
        if T == 0:
            raise ValueError("prefix_k must hold at least one prefix (T >= 1) when prefix_index is given")
        if prefix_index.dtype != torch.int64:
            raise TypeError(f"prefix_index must be int64, got {prefix_index.dtype}")
        rows = ("B", B) if cu_seqlens is None else ("n sequences", cu_seqlens.shape[0] - 1)
        if tuple(prefix_index.shape) != (rows[1],):
            raise ValueError(f"prefix_index must have shape [{rows[0]}={rows[1]}], got {_shape(prefix_index)}")
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index must be on {q.device} like q, got {prefix_index.device}")
        if check_index_values:
            check_prefix_index_values(prefix_index, T)
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(f"prefix_v must have the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}")

    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16 (float64 for the reference), got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")

    if key_padding_mask is not None:
        _require_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape [B={B}, S={S}], got {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device} like q, got {key_padding_mask.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or not 0 < scale < float("inf")):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 (keys within `window` positions of the query) or None, "
                         f"got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if sinks is not None:
        _require_tensor("sinks", sinks)
        if sinks.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"sinks must be a float tensor (one logit per query head), got {sinks.dtype}")
        if tuple(sinks.shape) != (Hq,):
            raise ValueError(f"sinks must have shape [Hq={Hq}], got {_shape(sinks)}")
        if sinks.device != q.device:
            raise ValueError(f"sinks must be on {q.device} like q, got {sinks.device}")


def validate_cu_seqlens(cu_seqlens, q, k, key_padding_mask, check_values: bool) -> None:
    """Packed sequences: one row (B = 1) of S keys, its queries the same S positions, split by cu_seqlens."""
    _require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [n + 1] with n >= 1 sequences, got {_shape(cu_seqlens)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    if B != 1 or L != S:
        raise ValueError(f"packed sequences (cu_seqlens) take one row whose queries are its keys: B = 1 and L = S, "
                         f"got q {_shape(q)} and k {_shape(k)}")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask must be None with cu_seqlens (packed sequences have no padding)")
    if check_values:
        check_cu_seqlens_values(cu_seqlens, S)


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, S: int) -> None:
    """cu_seqlens must start at 0, end at S and never decrease (reads the values: one device sync)."""
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != S or any(b < a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 8 else [*values[:4], "...", *values[-2:]]
        raise ValueError(f"cu_seqlens must start at 0, end at S={S} and be non-decreasing, got {shown}")


def check_prefix_index_values(prefix_index: torch.Tensor, T: int) -> None:
    """prefix_index values must pick one of the T prefixes (reads the values: one device sync)."""
    if prefix_index.numel() == 0:
        return
    lo, hi = int(prefix_index.min()), int(prefix_index.max())
    if lo < 0 or hi >= T:
        raise ValueError(f"prefix_index values must lie in [0, T={T}), got values in [{lo}, {hi}]")
