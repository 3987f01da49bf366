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
    check_index_values: bool = True,
) -> None:
    """Raise TypeError / ValueError naming the argument and what was expected. Reads only shapes, dtypes and
    devices, except the range of `prefix_index` (a device sync on CUDA), which `check_index_values=False`
    leaves to a caller that checked it once for many calls (the transformers integration, once per forward)."""
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
        if tuple(prefix_index.shape) != (B,):
            raise ValueError(f"prefix_index must have shape [B={B}], got {_shape(prefix_index)}")
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


def check_prefix_index_values(prefix_index: torch.Tensor, T: int) -> None:
    """prefix_index values must pick one of the T prefixes (reads the values: one device sync)."""
    if prefix_index.numel() == 0:
        return
    lo, hi = int(prefix_index.min()), int(prefix_index.max())
    if lo < 0 or hi >= T:
        raise ValueError(f"prefix_index values must lie in [0, T={T}), got values in [{lo}, {hi}]")
