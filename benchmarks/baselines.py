"""What users have today for attention over a shared prefix, as benchmark baselines (one module, one place).

Every method, ours and the baselines, is a `Method`: the leaf tensors that receive gradients and a
`forward()` that returns `[B, Hq, L, D]`. Building a method may do untimed work (the beforehand concatenation
of `sdpa-concat`, a `torch.compile`); `forward()` is what is timed.

- `prefix_kernels:<backend>`: the op of this library (`triton`, `cuda`, `cpu`, `reference`). `reference` is
  expand + cat + repeat + eager softmax, what PEFT does with transformers' eager attention.
- `sdpa-expand`: expand the prefix to the batch, cat it in front of K/V, repeat_kv, and call
  `torch.nn.functional.scaled_dot_product_attention` with a dense bool mask: what PEFT + SDPA does (with a
  prefix the mask is never None, so SDPA leaves its flash path and GQA heads are physically repeated).
- `sdpa-concat`: K/V already hold the prefix (concatenated beforehand, untimed; the cost without the copy),
  SDPA with `enable_gqa` and the bottom-right causal mask (`causal_lower_right`), i.e. no dense mask.
  Its gradients go to the concatenated K/V, not to a shared prefix (no reduction over the batch).
- `flex`: `torch.nn.attention.flex_attention` (compiled), one call over the prefix (no mask), one over the
  sequence with a bottom-right causal block mask, the two merged by their log-sum-exp. The prefix is
  expanded to the batch as a view (no copy). CUDA only: on CPU (torch 2.13) compiled flex has no LSE output
  and flex has no backward.
- `flash-attn`: `flash_attn_func` on expand + cat K/V in its `[B, S, H, D]` layout (bottom-right causal,
  GQA native), when the `flash_attn` package is importable (CUDA fp16/bf16 only).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("prefix_kernels.benchmarks")

BASELINES = ("sdpa-expand", "sdpa-concat", "flex", "flash-attn")


@dataclass
class Method:
    name: str
    leaves: tuple  # tensors whose .grad is cleared between calls
    forward: Callable[[], torch.Tensor]


def _visible(B: int, L: int, S: int, P: int, causal: bool, device) -> torch.Tensor:
    """bool [1, 1, L, P + S]: every query sees the prefix; causal bottom-right over the sequence."""
    cols = torch.arange(S, device=device)
    rows = torch.arange(L, device=device)
    seq = cols[None, :] <= rows[:, None] + (S - L) if causal else torch.ones(L, S, dtype=torch.bool, device=device)
    return torch.cat([torch.ones(L, P, dtype=torch.bool, device=device), seq], dim=1)[None, None]


def _expand_cat(prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([prefix.unsqueeze(0).expand(x.shape[0], -1, -1, -1), x], dim=2)


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # ImportError, or a broken build raising anything at import
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # one compiled graph per shape of a sweep
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex_attention, dynamic=False)


def unavailable_reason(name: str, device: str, dtype: torch.dtype, quick: bool = False,
                       mode: str = "fwd") -> str | None:
    """None if baseline `name` can run `mode` here, else why not (logged by the caller)."""
    if name in ("sdpa-expand", "sdpa-concat"):
        return None
    if name == "flex":
        try:
            from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: F401
        except ImportError as e:
            return f"torch {torch.__version__} has no flex_attention with AuxRequest ({e})"
        if not device.startswith("cuda"):
            # Verified with torch 2.13 CPU: no backward on CPU at all, and compiled flex_attention on CPU raises
            # "only supports inference and `return_lse` is not supported yet"; eager flex materializes the scores.
            return (f"not on CPU (torch {torch.__version__}): compiled flex_attention has no return_lse and no "
                    "backward on CPU; the eager fallback materializes the scores")
        return None
    if name == "flash-attn":
        if _flash_attn_func() is None:
            return "flash_attn is not installed"
        if not device.startswith("cuda") or dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn runs on CUDA fp16/bf16 only"
        return None
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")


def ours(backend: str, tensors, causal: bool) -> Method:
    import prefix_kernels

    q, k, v, pk, pv = tensors
    if backend == "reference":
        # PEFT + eager attention: the plain expand + cat + softmax under autograd (the backend's op adds the
        # log-sum-exp its contract returns, which eager attention does not pay for).
        return Method(backend, tuple(tensors),
                      lambda: prefix_kernels.reference_prefix_attention(q, k, v, pk, pv, causal=causal))
    return Method(backend, tuple(tensors),
                  lambda: prefix_kernels.prefix_attention(q, k, v, pk, pv, causal=causal, backend=backend))


def sdpa_expand(tensors, causal: bool) -> Method:
    q, k, v, pk, pv = tensors
    B, Hq, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[1]
    group = Hq // Hkv
    mask = _visible(B, L, S, P, causal, q.device)  # built once, like transformers' mask per forward

    def forward():
        keys = _expand_cat(pk, k).repeat_interleave(group, dim=1)
        values = _expand_cat(pv, v).repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return Method("sdpa-expand", tuple(tensors), forward)


def sdpa_concat(tensors, causal: bool) -> Method:
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, pk, pv = tensors
    L = q.shape[2]
    with torch.no_grad():
        kc = _expand_cat(pk, k).contiguous().requires_grad_(k.requires_grad)
        vc = _expand_cat(pv, v).contiguous().requires_grad_(v.requires_grad)
    total = kc.shape[2]
    gqa = q.shape[1] != kc.shape[1]

    def forward():
        if causal and L > 1:
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=causal_lower_right(L, total), enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa)

    return Method("sdpa-concat", (q, kc, vc), forward)


def flex(tensors, causal: bool) -> Method:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    q, k, v, pk, pv = tensors
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    gqa = Hq != Hkv
    fn = _compiled_flex()
    offset = S - L
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + offset, None, None, L, S,
                                       device=q.device.type if q.device.type == "cpu" else q.device)
    aux = AuxRequest(lse=True)

    def forward():
        pk_b = pk.unsqueeze(0).expand(B, -1, -1, -1)
        pv_b = pv.unsqueeze(0).expand(B, -1, -1, -1)
        o1, a1 = fn(q, pk_b, pv_b, enable_gqa=gqa, return_aux=aux)
        o2, a2 = fn(q, k, v, block_mask=block_mask, enable_gqa=gqa, return_aux=aux)
        lse = torch.logaddexp(a1.lse, a2.lse)
        w1 = torch.exp(a1.lse - lse).unsqueeze(-1)
        w2 = torch.exp(a2.lse - lse).unsqueeze(-1)
        return (o1.float() * w1 + o2.float() * w2).to(q.dtype)

    return Method("flex", tuple(tensors), forward)


def flash_attn(tensors, causal: bool) -> Method:
    fa = _flash_attn_func()
    q, k, v, pk, pv = tensors

    def forward():
        keys = _expand_cat(pk, k).transpose(1, 2)
        values = _expand_cat(pv, v).transpose(1, 2)
        out = fa(q.transpose(1, 2), keys, values, causal=causal)
        return out.transpose(1, 2)

    return Method("flash-attn", tuple(tensors), forward)


_BUILDERS = {"sdpa-expand": sdpa_expand, "sdpa-concat": sdpa_concat, "flex": flex, "flash-attn": flash_attn}


def build(name: str, tensors, causal: bool) -> Method:
    """A Method for `name`: a prefix_kernels backend or one of BASELINES."""
    if name in _BUILDERS:
        return _BUILDERS[name](tensors, causal)
    return ours(name, tensors, causal)
