"""What users have today for attention over a shared prefix, as benchmark baselines (one module, one place).

Every method, ours and the baselines, is a `Method`: the leaf tensors that receive gradients and a
`forward()` that returns `[B, Hq, L, D]`. Building a method may do untimed work (the beforehand concatenation
of `sdpa-concat`, a `torch.compile`); `forward()` is what is timed.

- `prefix_kernels:<backend>`: the op of this library (`triton`, `cuda`, `cpu`, `reference`). `reference` is
  expand + cat + repeat + eager softmax, what PEFT does with transformers' eager attention.
- `sdpa-expand`: expand the prefix to the batch, cat it in front of K/V, repeat_kv, and call
  `torch.nn.functional.scaled_dot_product_attention` with a dense bool [1, 1, L, P + S] mask, always (also
  where transformers skips the mask: bidirectional, decode); `sdpa-peft` is transformers' exact path.
- `sdpa-peft`: PEFT's real path with transformers' `sdpa` attention: expand + cat as above, the mask built by
  `transformers.masking_utils.sdpa_mask` exactly as for a prefix in the cache (bool [B, 1, L, P + S], a
  batch-expanded view; None where transformers skips it: decode, bidirectional without padding), repeat_kv
  with a mask and `enable_gqa` without, as transformers' sdpa_attention_forward does.
- `sdpa-concat`: K/V already hold the prefix (concatenated beforehand, untimed; the cost without the copy),
  SDPA with `enable_gqa` and the bottom-right causal mask (`causal_lower_right`), i.e. no dense mask.
  Its gradients go to the concatenated K/V, not to a shared prefix (no reduction over the batch).
  `sdpa-concat:flash`, `:efficient`, `:cudnn` (CUDA): the same with that SDPA kernel forced by
  `torch.nn.attention.sdpa_kernel`, so the name says which kernel ran (one that cannot run the case errors
  and is skipped with the reason).
- `flex`: `torch.nn.attention.flex_attention` (compiled), one call over the prefix (no mask), one over the
  sequence with a bottom-right causal block mask, the two merged by their log-sum-exp. The prefix is
  expanded to the batch as a view (no copy). CUDA only: on CPU (torch 2.13) compiled flex has no LSE output
  and flex has no backward.
- `triton:fused-bwd`: ours, the triton backend with its opt-in one-launch backward (PREFIX_KERNELS_TRITON_BWD=fused
  around every call of the method: forward and backward), timed fwd+bwd only (its forward is triton's).
- `triton:atomic-bwd`: the same with the opt-in atomic backward (PREFIX_KERNELS_TRITON_BWD=atomic, FlashAttention-2's:
  dq added with fp32 atomics) and `deterministic=False`, which it needs (so its prefix reduction is atomic too).
- `triton:tma-fwd`: ours with the opt-in TMA forward (PREFIX_KERNELS_TRITON_FWD=tma: tiles moved by tensor
  descriptors, sm_90 and newer), timed fwd and fwd+bwd (its backward is triton's).
- `flash-attn`: `flash_attn_func` on expand + cat K/V in its `[B, S, H, D]` layout (bottom-right causal,
  GQA native), when the `flash_attn` package is importable (CUDA fp16/bf16 only).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("prefix_kernels.benchmarks")

BASELINES = ("sdpa-peft", "sdpa-expand", "sdpa-concat", "flex", "flash-attn")
# `sdpa-concat` with one SDPA backend forced (torch.nn.attention.sdpa_kernel): the name says which one ran.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
SDPA_CONCAT_FORCED = tuple(f"sdpa-concat:{b}" for b in SDPA_BACKENDS)
# The triton backend with an opt-in mode (docs/kernels.md "The fused backward", "The atomic backward", "TMA"), for
# the GPU to decide on them: name -> (the environment of its calls, their `deterministic`, whether its forward
# differs from triton's, so that a forward-only time says something).
TRITON_FUSED_BWD = "triton:fused-bwd"
TRITON_ATOMIC_BWD = "triton:atomic-bwd"
TRITON_TMA_FWD = "triton:tma-fwd"
TRITON_VARIANTS = {TRITON_FUSED_BWD: ({"PREFIX_KERNELS_TRITON_BWD": "fused"}, True, False),
                   TRITON_ATOMIC_BWD: ({"PREFIX_KERNELS_TRITON_BWD": "atomic"}, False, False),
                   TRITON_TMA_FWD: ({"PREFIX_KERNELS_TRITON_FWD": "tma"}, True, True)}


@dataclass
class Method:
    name: str
    leaves: tuple  # tensors whose .grad is cleared between calls
    forward: Callable[[], torch.Tensor]
    # maps the leaves' gradients to (dq, dk, dv, dprefix_k, dprefix_v) of the op (None: the leaves are those five)
    canonical_grads: Callable[[tuple], tuple] | None = None
    # environment variables the method's calls run under (the backward reads them when it runs, after forward())
    env: dict | None = None

    @contextlib.contextmanager
    def scope(self):
        saved = {name: os.environ.get(name) for name in self.env or {}}
        os.environ.update(self.env or {})
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def grads(self) -> tuple:
        """The gradients of (q, k, v, prefix_k, prefix_v) left in the leaves' .grad by a backward."""
        got = tuple(t.grad for t in self.leaves)
        return got if self.canonical_grads is None else self.canonical_grads(got)


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
    if name in TRITON_VARIANTS:
        from prefix_kernels import available_backends

        if not device.startswith("cuda") or "triton" not in available_backends(device):
            return "the triton backend is timed on CUDA only"
        if name == TRITON_TMA_FWD and torch.cuda.get_device_capability(device)[0] < 9:
            return "TMA needs compute capability 9.0 or newer"
        if mode == "fwd" and not TRITON_VARIANTS[name][2]:
            return "its forward is triton's: timed with a backward only"
        return None
    if name in ("sdpa-expand", "sdpa-concat", "sdpa-peft"):
        return None
    if name in SDPA_CONCAT_FORCED:
        if not device.startswith("cuda"):
            return "forced SDPA backends (flash, efficient, cuDNN) are CUDA kernels"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except ImportError as e:
            return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel ({e})"
        if not hasattr(SDPBackend, SDPA_BACKENDS[name.split(":")[1]]):
            return f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[name.split(':')[1]]}"
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
    if backend in TRITON_VARIANTS:
        env, deterministic, _ = TRITON_VARIANTS[backend]
        return Method(backend, tuple(tensors),
                      lambda: prefix_kernels.prefix_attention(q, k, v, pk, pv, causal=causal, backend="triton",
                                                              deterministic=deterministic),
                      env=env)
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


def _transformers_sdpa_mask(B: int, L: int, S: int, P: int, causal: bool, device):
    """The mask transformers' SDPA attention gets when PEFT put a P-token prefix in the cache: built by
    `transformers.masking_utils.sdpa_mask` as `create_causal_mask` / `create_bidirectional_mask` call it (query
    offset P + S - L, PEFT's all-ones attention mask extended over the prefix, the `is_causal` /
    bidirectional skips allowed). A dense bool [B, 1, L, P + S] (a batch-expanded view), or None where
    transformers skips the mask (decode L = 1; bidirectional without padding). Raises ImportError without
    transformers."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    kv = P + S
    return sdpa_mask(batch_size=B, q_length=L, kv_length=kv, q_offset=kv - L, kv_offset=0,
                     mask_function=causal_mask_function if causal else bidirectional_mask_function,
                     attention_mask=torch.ones(B, kv, dtype=torch.bool, device=device),
                     allow_is_causal_skip=causal, allow_is_bidirectional_skip=not causal, device=device)


def sdpa_peft(tensors, causal: bool) -> Method:
    """PEFT's real path with transformers' `sdpa` attention: the prefix expanded to the batch (PEFT's
    `get_prompt`), concatenated in front of K/V by the cache, transformers' mask (see _transformers_sdpa_mask;
    our own `_visible` mask, batch-expanded, without transformers), then transformers' sdpa_attention_forward:
    repeat_kv unless the mask is None (then `enable_gqa`), `is_causal` only when the mask was skipped."""
    q, k, v, pk, pv = tensors
    B, Hq, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[1]
    group = Hq // Hkv
    try:
        mask = _transformers_sdpa_mask(B, L, S, P, causal, q.device)
    except ImportError:
        mask = _visible(B, L, S, P, causal, q.device).expand(B, -1, -1, -1)
    is_causal = mask is None and causal and L > 1

    def forward():
        keys, values = _expand_cat(pk, k), _expand_cat(pv, v)
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=is_causal, enable_gqa=group > 1)
        keys = keys[:, :, None].expand(B, Hkv, group, P + S, D).reshape(B, Hq, P + S, D)  # repeat_kv
        values = values[:, :, None].expand(B, Hkv, group, P + S, D).reshape(B, Hq, P + S, D)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return Method("sdpa-peft", tuple(tensors), forward)


def sdpa_concat(tensors, causal: bool, backend: str | None = None) -> Method:
    """`backend` ("flash", "efficient", "cudnn") forces that SDPA kernel: an error (not eligible) skips it."""
    import contextlib

    from torch.nn.attention.bias import causal_lower_right

    q, k, v, pk, pv = tensors
    L = q.shape[2]
    with torch.no_grad():
        kc = _expand_cat(pk, k).contiguous().requires_grad_(k.requires_grad)
        vc = _expand_cat(pv, v).contiguous().requires_grad_(v.requires_grad)
    total = kc.shape[2]
    gqa = q.shape[1] != kc.shape[1]

    def context():
        if backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])])

    def forward():
        with context():
            if causal and L > 1:
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=causal_lower_right(L, total),
                                                      enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa)

    P = pk.shape[1]

    def canonical(grads):  # [prefix expanded to the batch] + sequence -> sequence, prefix summed over the batch
        dq, dkc, dvc = grads
        if dkc is None:
            return dq, None, None, None, None
        return dq, dkc[:, :, P:], dvc[:, :, P:], dkc[:, :, :P].sum(0), dvc[:, :, :P].sum(0)

    return Method("sdpa-concat" if backend is None else f"sdpa-concat:{backend}", (q, kc, vc), forward, canonical)


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


_BUILDERS = {"sdpa-peft": sdpa_peft, "sdpa-expand": sdpa_expand, "sdpa-concat": sdpa_concat, "flex": flex,
             "flash-attn": flash_attn,
             **{f"sdpa-concat:{b}": functools.partial(sdpa_concat, backend=b) for b in SDPA_BACKENDS}}


def build(name: str, tensors, causal: bool) -> Method:
    """A Method for `name`: a prefix_kernels backend or one of BASELINES."""
    if name in _BUILDERS:
        return _BUILDERS[name](tensors, causal)
    return ours(name, tensors, causal)
