"""Shapes, inputs, the backends under test and the accuracy criterion shared by the backend tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from prefix_kernels.ops import available_backends, prefix_attention, reference_prefix_attention
from prefix_kernels.ops.backends import features_of
from prefix_kernels.ops.triton import interpreting


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    L: int = 17
    S: int = 17
    P: int = 5
    D: int = 32
    causal: bool = True
    padding: bool = False  # random key padding, with row 0 fully padded when P == 0
    left_pad: int = 0  # the first left_pad keys of every row are padding (left-padded generation batches)
    T: int = 0  # > 0: T prefixes chosen per row by prefix_index
    # "hf": q/k/v as transposes of [B, L, H, D], as transformers passes them; "strided": a column-strided
    # head dim in k, permuted v and prefix_k (no unit stride where the kernels would like one)
    layout: str = "contiguous"
    # The op's optional features (docs/op.md): a sliding window, soft-capping, one sink logit per query head,
    # and packed sequences (their lengths; B = 1 and L = S = their sum).
    window: int = 0
    softcap: float = 0.0
    sinks: bool = False
    packed: tuple[int, ...] = ()

    def __post_init__(self):
        if self.packed:
            assert self.B == 1 and self.L == self.S == sum(self.packed), "packed cases: B = 1, L = S = sum(packed)"

    def features(self) -> tuple[str, ...]:
        return features_of(window=self.window or None, softcap=self.softcap or None, sinks=True if self.sinks else None,
                           cu_seqlens=True if self.packed else None)

    def id(self) -> str:
        parts = [f"B{self.B}", f"H{self.Hq}-{self.Hkv}", f"L{self.L}", f"S{self.S}", f"P{self.P}", f"D{self.D}",
                 "causal" if self.causal else "bidir"]
        parts += ["pad"] if self.padding else []
        parts += [f"leftpad{self.left_pad}"] if self.left_pad else []
        parts += [f"T{self.T}"] if self.T else []
        parts += [self.layout] if self.layout != "contiguous" else []
        parts += [f"w{self.window}"] if self.window else []
        parts += [f"cap{self.softcap:g}"] if self.softcap else []
        parts += ["sinks"] if self.sinks else []
        parts += ["packed" + "+".join(map(str, self.packed))] if self.packed else []
        return "-".join(parts)


def packed_case(lengths: tuple[int, ...], **kw) -> Case:
    n = sum(lengths)
    return Case(B=1, L=n, S=n, packed=tuple(lengths), **kw)


BASE = Case()
# The coverage list of the op, one knob at a time around BASE: causal / bidirectional, P = 0 (with a row that
# sees no key), P = 1, P > S, decode (L = 1), S > L, L > S, head dims 32..256 (powers of two or not), GQA /
# MQA / MHA, padding, left padding, T prefixes, the transposed "hf" layout and odd strides.
SWEEP = [
    BASE,
    replace(BASE, causal=False),
    replace(BASE, P=0, padding=True),
    replace(BASE, P=0, causal=False, padding=True),
    replace(BASE, P=1),
    replace(BASE, L=9, S=9, P=37),
    replace(BASE, L=1, S=40, P=19),
    replace(BASE, L=1, S=40, P=19, causal=False, padding=True),
    replace(BASE, L=9, S=33, P=16),
    replace(BASE, L=20, S=11, P=3),
    replace(BASE, L=20, S=11, P=3, causal=False),
    replace(BASE, D=64, P=16),
    replace(BASE, D=80, L=9, S=9),
    replace(BASE, D=96, L=9, S=9),
    replace(BASE, D=128, L=9, S=9),
    replace(BASE, D=256, B=1, Hq=2, Hkv=1, L=9, S=9),
    replace(BASE, Hq=4, Hkv=1),
    replace(BASE, Hq=6, Hkv=2, L=9, S=9),
    replace(BASE, Hq=3, Hkv=3, L=9, S=9),
    replace(BASE, padding=True),
    replace(BASE, padding=True, causal=False, P=21),
    replace(BASE, L=20, S=40, P=3, left_pad=20),
    replace(BASE, L=20, S=40, P=3, left_pad=20, causal=False, padding=True),
    replace(BASE, layout="hf"),
    replace(BASE, layout="strided", causal=False),
    replace(BASE, layout="hf", padding=True, S=24, L=24),
    replace(BASE, B=4, T=3, padding=True),
    replace(BASE, B=3, T=2, causal=False, L=9, S=12),
    replace(BASE, B=1, L=33, S=33, P=20),
    replace(BASE, B=3, Hq=2, Hkv=1, L=5, S=5, P=3),
]


# ---- the backends under test --------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def in_interpreter(backend: str, device: str) -> bool:
    """The triton kernels run in Triton's interpreter (CPU tensors): slow, so tests keep its shapes tiny."""
    return backend == "triton" and device == "cpu" and interpreting()


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    # bf16 `tl.dot` is wrong in Triton's interpreter (errors ~1e8); bf16 triton runs on a GPU.
    return [torch.float32, torch.float16] if in_interpreter(backend, device) else ALL_DTYPES


def targets(*, include_reference: bool = True) -> list:
    """pytest params (backend, device) for every backend available on every device here: on CPU the
    reference, the C++ kernels and triton under TRITON_INTERPRET=1; with a GPU also triton, cuda and the
    reference on CUDA tensors (`gpu` marker)."""
    params = []
    for device in DEVICES:
        for name in available_backends(device):
            if name == "reference" and not include_reference:
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def target_dtypes() -> list:
    """pytest params (backend, device, dtype) over `targets()` and each target's dtypes."""
    params = []
    for p in targets():
        name, device = p.values
        for dtype in dtypes_for(name, device):
            params.append(pytest.param(name, device, dtype, id=f"{p.id}-{str(dtype)[6:]}", marks=p.marks))
    return params


# ---- inputs and the criterion -------------------------------------------------------------------------------


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if case.layout == "hf":
        q = randn(case.B, case.L, case.Hq, case.D).transpose(1, 2)
        k = randn(case.B, case.S, case.Hkv, case.D).transpose(1, 2)
        v = randn(case.B, case.S, case.Hkv, case.D).transpose(1, 2)
    else:
        q = randn(case.B, case.Hq, case.L, case.D)
        k = randn(case.B, case.Hkv, case.S, case.D)
        v = randn(case.B, case.Hkv, case.S, case.D)
    prefix_shape = (case.T, case.Hkv, case.P, case.D) if case.T else (case.Hkv, case.P, case.D)
    prefix_k, prefix_v = randn(*prefix_shape), randn(*prefix_shape)
    if case.layout == "strided":
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
        v = v.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
        prefix_k = prefix_k.transpose(-1, -2).contiguous().transpose(-1, -2)
    inputs = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    kwargs = dict(causal=case.causal)
    if case.padding or case.left_pad:
        mask = torch.rand(case.B, case.S, generator=gen) > 0.3 if case.padding else torch.ones(case.B, case.S) > 0
        if case.S:
            mask[:, -1] = True  # keep a real token per row by default ...
        if case.padding and case.P == 0 and case.B > 1:
            mask[0] = False  # ... except a fully padded row, which must give zeros and zero gradients
        mask[:, : case.left_pad] = False
        kwargs["key_padding_mask"] = mask.to(device)
    if case.T:
        rows = len(case.packed) or case.B
        kwargs["prefix_index"] = (torch.arange(rows) % case.T).flip(0).to(device)
    if case.window:
        kwargs["window"] = case.window
    if case.softcap:
        kwargs["softcap"] = case.softcap
    if case.sinks:  # a tensor input: its gradient is checked like the others
        inputs["sinks"] = (torch.randn(case.Hq, generator=gen) * 2).to(device=device, dtype=dtype)
    if case.packed:
        kwargs["cu_seqlens"] = torch.tensor([0, *torch.tensor(case.packed).cumsum(0).tolist()], dtype=torch.int32,
                                            device=device)
    grad_out = randn(case.B, case.Hq, case.L, case.D)
    return dict(tensors=inputs, kwargs=kwargs, grad_out=grad_out)


GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def run_with_grads(fn, tensors: dict, kwargs: dict, grad_out: torch.Tensor, dtype=None):
    leaves = {n: (t.detach().to(dtype) if dtype else t.detach()).requires_grad_() for n, t in tensors.items()}
    out = fn(**leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {n: leaves[n].grad for n in (*GRAD_NAMES, "sinks") if n in leaves}


def op_call(backend: str, *, dropout_p: float = 0.0, seed: int = 0, deterministic: bool = True):
    """The backend's forward op with an explicit dropout seed, called like `prefix_attention` (returns out)."""
    fwd = getattr(torch.ops.prefix_kernels, f"{backend}_fwd").default

    def call(q, k, v, prefix_k, prefix_v, *, causal=True, key_padding_mask=None, prefix_index=None, scale=None,
             window=None, softcap=None, sinks=None, cu_seqlens=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        out, _lse = fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, cu_seqlens, sinks, causal,
                        int(window or 0), float(softcap or 0.0), float(scale), float(dropout_p), seed, deterministic)
        return out

    return call


# The error floor absorbs the cases where the low-precision reference happens to be near exact.
ABS_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def assert_matches_reference(case: Case, dtype: torch.dtype, device: str, backend: str, *,
                             dropout_p: float = 0.0, seed: int | None = None, deterministic: bool = True) -> dict:
    """flash-attention's criterion: the backend's max error against the float64 reference is at most twice
    that of the reference computed in the same dtype (plus a small floor), for the output and all five
    gradients. With `seed`, the backend's op runs with that dropout seed and the reference draws the same
    mask (dropout replay); without it, through `prefix_attention`."""
    data = make_inputs(case, dtype, device)
    kwargs = data["kwargs"]
    ref_kwargs = dict(kwargs, dropout_p=dropout_p, seed=seed)
    oracle_out, oracle_grads = run_with_grads(reference_prefix_attention, data["tensors"], ref_kwargs,
                                              data["grad_out"], dtype=torch.float64)
    same_out, same_grads = run_with_grads(reference_prefix_attention, data["tensors"], ref_kwargs,
                                          data["grad_out"])
    if seed is None:
        assert dropout_p == 0.0, "dropout is compared through an explicit seed"

        def fn(**kw):
            return prefix_attention(**kw, backend=backend, deterministic=deterministic)
    else:
        fn = op_call(backend, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
    out, grads = run_with_grads(fn, data["tensors"], kwargs, data["grad_out"])
    assert out.dtype == dtype and out.shape == (case.B, case.Hq, case.L, case.D)
    assert torch.isfinite(out).all()
    report = {}
    for name, got, same, want in [("out", out, same_out, oracle_out)] + [
        (n, grads[n], same_grads[n], oracle_grads[n]) for n in oracle_grads
    ]:
        assert got.shape == want.shape and got.dtype == dtype, name
        if want.numel() == 0:
            continue
        err = (got.double() - want).abs().max().item()
        ref_err = (same.double() - want).abs().max().item()
        report[name] = (err, ref_err)
        assert err <= 2 * ref_err + ABS_FLOOR[dtype], (
            f"{name}: backend error {err:.3e} > 2 x reference {dtype} error {ref_err:.3e} + {ABS_FLOOR[dtype]:.0e}")
    if case.P == 0 and case.padding and case.B > 1:
        # Row 0 has no visible key: zeros out, zero gradients, no NaN.
        assert out[0].abs().max() == 0 and grads["q"][0].abs().max() == 0
    return report
