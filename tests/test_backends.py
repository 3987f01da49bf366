"""Every backend against the op contract (docs/op.md), one parametrized suite.

The backends are those available here (`attention_cases.targets()`): on CPU `reference`, `cpu` (the C++
kernels) and `triton` (its real kernels in Triton's interpreter); with a GPU also `triton`, `cuda` and
`reference` on CUDA tensors (`gpu` marker). Each one is checked for: output and all five gradients against the
float64 oracle (flash-attention's criterion, attention_cases.assert_matches_reference), the log-sum-exp it
returns, dropout replay (a kernel op run with an explicit seed equals the oracle drawing the same Philox mask),
bitwise repeatability, torch.compile, `torch.library.opcheck` of both ops, `output_mask`, and the memory
layout of `out`. What only one backend has lives in its own file (test_cpu_backend.py, ...).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import (
    ALL_DTYPES,
    BASE,
    GRAD_NAMES,
    SWEEP,
    Case,
    assert_matches_reference,
    in_interpreter,
    make_inputs,
    op_call,
    run_with_grads,
    target_dtypes,
    targets,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from prefix_kernels.ops import available_backends, prefix_attention, resolve_backend
from prefix_kernels.ops.backends import unavailable_reason
from prefix_kernels.ops.dropout import dropout_keep_mask
from prefix_kernels.ops.reference import reference_lse

TARGETS = targets()


def ops(backend: str):
    return (getattr(torch.ops.prefix_kernels, f"{backend}_fwd").default,
            getattr(torch.ops.prefix_kernels, f"{backend}_bwd").default)


def op_args(data: dict, scale: float | None = None) -> tuple:
    """The positional arguments of NAME_fwd after the five tensors up to `scale` (key_padding_mask, prefix_index,
    cu_seqlens, sinks, causal, window, softcap, scale), with the defaults of prefix_attention."""
    t, kw = data["tensors"], data["kwargs"]
    scale = t["q"].shape[-1] ** -0.5 if scale is None else scale
    return (kw.get("key_padding_mask"), kw.get("prefix_index"), None, None, kw["causal"], 0, 0.0, scale)


# ---- against the float64 oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", SWEEP, ids=Case.id)
@pytest.mark.parametrize("backend,device,dtype", target_dtypes())
def test_matches_reference(backend, device, dtype, case):
    assert_matches_reference(case, dtype, device, backend)


def _triton_decode_path_takes(case: Case) -> bool:
    from prefix_kernels.ops.triton import configs

    return (case.Hq // case.Hkv) * case.L <= configs.DECODE_MAX_ROWS and not case.packed


TRITON_TARGETS = [p for p in target_dtypes() if p.values[0] == "triton"]


@pytest.mark.parametrize("case", [c for c in SWEEP if TRITON_TARGETS and _triton_decode_path_takes(c)], ids=Case.id)
@pytest.mark.parametrize("backend,device,dtype", TRITON_TARGETS)
def test_matches_reference_regular_triton_forward(monkeypatch, backend, device, dtype, case):
    """The sweep's cases that triton's forward runs by its decode path (few query rows per KV head,
    test_triton_decode.py), once more through the regular forward kernel, so that both stay covered."""
    from prefix_kernels.ops.triton import configs

    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)
    assert_matches_reference(case, dtype, device, backend)


# Several query / key / prefix blocks per row for the GPU kernels (tiles of 16..128 rows): the first twelve
# sweep cases grown past a few tiles, P = 17, odd head dims, rows that see no key, causal S < L.
LARGE = [replace(c, B=3, L=4 * c.L + 61, S=4 * c.S + 61) for c in SWEEP[:12]] + [
    replace(BASE, P=17),
    replace(BASE, P=17, causal=False, layout="hf"),
    replace(BASE, D=33, P=17, L=9, S=12),
    replace(BASE, D=200, B=1, Hq=2, Hkv=1, L=21, S=21, P=17),
    replace(BASE, D=48, L=1, S=77, P=17, Hq=8, Hkv=1),
    replace(BASE, B=3, L=130, S=130, P=45, D=64, padding=True),
    replace(BASE, B=3, L=70, S=151, P=70, D=64, causal=False, padding=True, layout="hf"),
    replace(BASE, B=2, L=100, S=40, P=33, D=128, Hq=6, Hkv=2),
    replace(BASE, B=5, L=67, S=67, P=0, D=96, padding=True),
    replace(BASE, B=6, L=45, S=50, P=40, D=64, T=3, padding=True),
    replace(BASE, B=1, L=90, S=90, P=130, D=256, Hq=2, Hkv=1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", LARGE, ids=Case.id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_reference_large_gpu(backend, dtype, case):
    reason = unavailable_reason(backend, "cuda")
    assert reason is None, reason
    assert_matches_reference(case, dtype, "cuda", backend)


def _tiny(backend, device, case: Case) -> Case:
    """Shrink a case for Triton's interpreter (one Python loop per program)."""
    if in_interpreter(backend, device):
        return replace(case, B=min(case.B, 2), Hq=2, Hkv=1, L=min(case.L, 6), S=min(case.S, 7),
                       P=min(case.P, 5), D=16, T=min(case.T, 2))
    return case


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), Hkv=st.integers(1, 2), L=st.integers(1, 24),
    extra_s=st.integers(0, 12), P=st.integers(0, 24), D=st.sampled_from([16, 24, 32, 40]),
    causal=st.booleans(), padding=st.booleans(), layout=st.sampled_from(["contiguous", "hf"]),
)
@pytest.mark.parametrize("backend,device", targets(include_reference=False))
def test_random_shapes(backend, device, B, group, Hkv, L, extra_s, P, D, causal, padding, layout):
    case = Case(B=B, Hq=group * Hkv, Hkv=Hkv, L=L, S=L + extra_s, P=P, D=D, causal=causal, padding=padding,
                layout=layout)
    assert_matches_reference(case, torch.float32, device, backend)


LSE_CASES = [replace(BASE, P=0, padding=True, L=19, S=23), replace(BASE, B=3, T=2, L=9, S=12, padding=True)]


@pytest.mark.parametrize("case", LSE_CASES, ids=Case.id)
@pytest.mark.parametrize("backend,device,dtype", target_dtypes())
def test_lse(backend, device, dtype, case):
    """lse: fp32 [B, Hq, L] contiguous, the natural-log logsumexp of each row's scaled visible scores, +inf for
    a row with no visible key (P = 0 and row 0 fully padded), whose output is zeros."""
    case = _tiny(backend, device, case)
    data = make_inputs(case, dtype, device)
    t = data["tensors"]
    args = op_args(data)
    mask, index, causal, scale = args[0], args[1], args[4], args[7]
    out, lse = ops(backend)[0](*t.values(), *args, 0.0, 0, True)
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.L) and lse.is_contiguous()
    want = reference_lse(*(x.double() for x in t.values()), causal=causal, key_padding_mask=mask, scale=scale,
                         prefix_index=index)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[~finite] == float("inf")).all()
    if case.P == 0:
        assert not finite[0].any() and (out[0] == 0).all()
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert (lse.double()[finite] - want[finite]).abs().max().item() < tol


# ---- dropout -----------------------------------------------------------------------------------------------

DROPOUT_CASES = [replace(BASE, L=20, S=23, P=19), replace(BASE, B=3, T=2, causal=False, padding=True, L=9, S=12)]


# The reference backend draws torch's Bernoulli instead, as eager attention does (test_reference.py).
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=Case.id)
@pytest.mark.parametrize("backend,device,dtype", [p for p in target_dtypes() if p.values[0] != "reference"])
def test_dropout_replays_the_reference(backend, device, dtype, case):
    """The op with an explicit seed drops what `dropout_keep_mask(seed)` drops, in the forward and (from the
    same seed again) in the backward: the oracle drawing that mask gives the same output and gradients."""
    p, seed = 0.3, 2**40 + 1234567
    if in_interpreter(backend, device):
        case = replace(case, B=2, Hq=2, Hkv=1, L=5)
    assert_matches_reference(case, dtype, device, backend, dropout_p=p, seed=seed)
    # The comparison is not vacuous: the mask drops about p of the probabilities.
    keep = dropout_keep_mask(case.B, case.Hq, case.L, case.P, case.S, p, seed, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.1


def test_dropout_keep_mask_rate_and_seeds():
    p = 0.25
    B, Hq, L, P, S = 4, 8, 64, 16, 64
    keep = dropout_keep_mask(B, Hq, L, P, S, p, 2**40 + 7)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert torch.equal(keep, dropout_keep_mask(B, Hq, L, P, S, p, 2**40 + 7))
    assert not torch.equal(keep, dropout_keep_mask(B, Hq, L, P, S, p, 2**40 + 8))
    # Every (row, head, query) draws its own columns.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert dropout_keep_mask(1, 1, 4, 0, 4, 0.0, 3).all()


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif("triton" not in available_backends(TRITON_DEVICE), reason="triton is not available")
def test_triton_dropout_mask_is_dropout_keep_mask():
    """The oracle's torch Philox is Triton's `tl.rand`, bit for bit (and csrc/philox.h is too: the cpu and cuda
    dropout replays above)."""
    from prefix_kernels.ops.triton.launch import triton_dropout_mask

    for seed in (0, 987654321, 2**40 + 12345, 2**62 - 1):
        got = triton_dropout_mask(2, 3, 19, 5, 21, 0.3, seed, TRITON_DEVICE)
        assert torch.equal(got, dropout_keep_mask(2, 3, 19, 5, 21, 0.3, seed, TRITON_DEVICE)), seed


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 3, 19, 5, 21), (2048, 33, 1, 2, 3)], ids=["odd", "rows-past-65535"])
def test_triton_dropout_mask_on_cuda(shape):
    """The same on a GPU, also with more than 65535 (row, head) pairs: the mask kernel puts them on grid axis 0."""
    reason = unavailable_reason("triton", "cuda")
    assert reason is None, reason
    from prefix_kernels.ops.triton.launch import triton_dropout_mask

    B, Hq, L, P, S = shape
    for seed in (0, 2**40 + 12345):
        got = triton_dropout_mask(B, Hq, L, P, S, 0.3, seed, "cuda")
        assert torch.equal(got, dropout_keep_mask(B, Hq, L, P, S, 0.3, seed, "cuda")), seed


# ---- determinism -------------------------------------------------------------------------------------------


# The reference on CUDA tensors is plain torch (its index backward may use atomics): it promises nothing here.
@pytest.mark.parametrize("variant", ["shared", "multi-prefix", "dropout"])
@pytest.mark.parametrize("backend,device", [p for p in TARGETS if p.values != ("reference", "cuda")])
def test_two_runs_are_bitwise_equal(backend, device, variant):
    """Same inputs, same output and gradients bit for bit (the default deterministic=True: the prefix
    gradients are reduced in a fixed order; dropout from the same seed)."""
    case = Case(B=3, Hq=4, Hkv=2, L=7, S=9, P=5, D=16, padding=True, T=2 if variant == "multi-prefix" else 0)
    if in_interpreter(backend, device):
        case = replace(case, B=2, Hq=2, Hkv=1, L=5, S=6, P=3)
    elif device == "cuda":
        case = replace(case, B=9, L=150, S=150, P=64, D=64, Hq=8)  # several blocks, many prefix partials
    data = make_inputs(case, torch.float32 if device == "cpu" else torch.float16, device)
    fn = op_call(backend, dropout_p=0.2 if variant == "dropout" else 0.0, seed=4321)
    first = run_with_grads(fn, data["tensors"], data["kwargs"], data["grad_out"])
    second = run_with_grads(fn, data["tensors"], data["kwargs"], data["grad_out"])
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name


# ---- torch.compile -----------------------------------------------------------------------------------------


def _compile_backend(backend, device):
    return "inductor" if device == "cuda" else "aot_eager"


@pytest.mark.parametrize("how", ["by-name", "by-record", "dropout"])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_torch_compile_fullgraph(backend, device, how):
    """The op is opaque to torch.compile (its fake gives shapes and strides, its autograd the backward): a
    layer around it compiles without a graph break and equals eager, output and gradients. The backend is
    named, or given as the record `resolve_backend` returns (what the transformers integration passes). With
    dropout the seed is drawn eagerly (one graph break, so that every call draws a fresh seed): compiled
    without fullgraph, the seed drawn from torch's generator is the same as in eager."""
    case = _tiny(backend, device, replace(BASE, padding=True, L=9, S=11, T=2, B=3))
    data = make_inputs(case, torch.float32, device)
    chosen = backend if how == "by-name" else resolve_backend(backend, device)
    dropout_p = 0.25 if how == "dropout" else 0.0

    def layer(q, k, v, prefix_k, prefix_v, **kw):
        return prefix_attention(q * 2, k, v, prefix_k, prefix_v, backend=chosen, check_prefix_index=False,
                                dropout_p=dropout_p, **kw).sum(-1)

    grad = torch.ones(case.B, case.Hq, case.L, device=device)
    torch.manual_seed(11)
    eager_out, eager_grads = run_with_grads(layer, data["tensors"], data["kwargs"], grad)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=_compile_backend(backend, device), fullgraph=how != "dropout")
    torch.manual_seed(11)
    out, grads = run_with_grads(compiled, data["tensors"], data["kwargs"], grad)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-6, atol=1e-6, msg=name)


# ---- torch.library.opcheck ---------------------------------------------------------------------------------

# Tiny samples (opcheck runs each op several times, and triton may be in the interpreter).
OPCHECK_CASES = {
    "gqa-padding-dropout": Case(B=2, Hq=2, Hkv=1, L=3, S=5, P=2, D=8, padding=True),
    "prefix-bank": Case(B=2, Hq=1, Hkv=1, L=3, S=4, P=2, D=8, T=2, causal=False),
    "hf-layout": Case(B=1, Hq=2, Hkv=1, L=4, S=4, P=2, D=8, layout="hf"),
    "no-prefix": Case(B=2, Hq=1, Hkv=1, L=3, S=4, P=0, D=8, padding=True),
}


def _opcheck_inputs(name, backend, device, requires_grad):
    data = make_inputs(OPCHECK_CASES[name], torch.float32, device)
    tensors = [t.detach().requires_grad_(requires_grad) for t in data["tensors"].values()]
    return data, tensors, op_args(data)


@pytest.mark.parametrize("sample", list(OPCHECK_CASES))
@pytest.mark.parametrize("backend,device", TARGETS)
def test_opcheck_fwd(backend, device, sample):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of NAME_fwd (with gradients)."""
    _, tensors, rest = _opcheck_inputs(sample, backend, device, requires_grad=True)
    dropout = (0.25, 99) if sample == "gqa-padding-dropout" else (0.0, 0)
    torch.library.opcheck(ops(backend)[0], (*tensors, *rest, *dropout, True))


BWD_MASKS = {"gqa-padding-dropout": [True, True, True], "prefix-bank": [True, True, False],
             "hf-layout": [False, True, True], "no-prefix": [True, False, True]}


@pytest.mark.parametrize("sample", list(OPCHECK_CASES))
@pytest.mark.parametrize("backend,device", TARGETS)
def test_opcheck_bwd(backend, device, sample):
    data, tensors, rest = _opcheck_inputs(sample, backend, device, requires_grad=False)
    fwd, bwd = ops(backend)
    dropout = (0.25, 99) if sample == "gqa-padding-dropout" else (0.0, 0)
    out, lse = fwd(*tensors, *rest, *dropout, True)
    torch.library.opcheck(bwd, (data["grad_out"], *tensors, out, lse, *rest, *dropout, True, BWD_MASKS[sample]))


# ---- output_mask -------------------------------------------------------------------------------------------


class BwdCalls(TorchDispatchMode):
    """Records the output_mask of every NAME_bwd call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "prefix_kernels" and func._opname.endswith("_bwd"):
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend,device", TARGETS)
def test_output_mask(backend, device):
    """A gradient not asked for comes back as an empty [0] tensor, and the ones asked for are bitwise those of
    a call that asks for everything."""
    case = _tiny(backend, device, Case(B=3, Hq=4, Hkv=2, L=7, S=9, P=5, D=16, padding=True))
    data = make_inputs(case, torch.float32, device)
    tensors = list(data["tensors"].values())
    fwd, bwd = ops(backend)
    rest = op_args(data)
    out, lse = fwd(*tensors, *rest, 0.0, 0, True)
    everything = bwd(data["grad_out"], *tensors, out, lse, *rest, 0.0, 0, True, [True, True, True])
    assert all(g.shape == t.shape for g, t in zip(everything, tensors))
    for mask in ([True, True, False], [False, True, True], [True, False, False], [False, False, True]):
        grads = bwd(data["grad_out"], *tensors, out, lse, *rest, 0.0, 0, True, mask)
        wanted = (mask[0], mask[1], mask[1], mask[2], mask[2])
        for name, got, full, t, w in zip(GRAD_NAMES, grads, everything, tensors, wanted):
            if w:
                assert torch.equal(got, full), (mask, name)
            else:
                assert got.shape == (0,) and got.dtype == t.dtype and got.device == t.device, (mask, name)


# The reference's forward op is a composite: autograd runs through its torch ops, never its backward op.
@pytest.mark.parametrize("backend,device", targets(include_reference=False))
def test_autograd_asks_only_for_needed_gradients(backend, device):
    """A frozen prefix gets no gradient work (output_mask [dq, dk+dv, no dprefix]); a q that needs no gradient
    gets no dq. The gradients computed equal those of a call where everything requires grad."""
    case = _tiny(backend, device, Case(B=3, Hq=4, Hkv=2, L=7, S=9, P=5, D=16))
    data = make_inputs(case, torch.float32, device)

    def grads_with(frozen):
        leaves = {n: t.detach().requires_grad_(n not in frozen) for n, t in data["tensors"].items()}
        with BwdCalls() as calls:
            prefix_attention(**leaves, **data["kwargs"], backend=backend).backward(data["grad_out"])
        return calls.masks, {n: leaves[n].grad for n in GRAD_NAMES}

    masks, full = grads_with(())
    assert masks == [[True, True, True]]
    for frozen, expected in ((("prefix_k", "prefix_v"), [True, True, False]), (("q",), [False, True, True]),
                             (("q", "k", "v"), [False, False, True])):
        masks, grads = grads_with(frozen)
        assert masks == [expected], (frozen, masks)
        for name in GRAD_NAMES:
            if name in frozen:
                assert grads[name] is None, name
            else:
                assert torch.equal(grads[name], full[name]), (frozen, name)


# ---- memory layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", TARGETS)
def test_out_and_grads_keep_the_layout_of_their_inputs(backend, device):
    """q, k, v as transformers' [B, L, H, D] buffers seen as [B, H, L, D]: out and dq have q's layout (so
    `out.transpose(1, 2)` is contiguous, no copy), dk and dv those of k and v; and the values are those of
    contiguous copies of the same inputs."""
    case = _tiny(backend, device, Case(B=2, Hq=4, Hkv=2, L=7, S=9, P=5, D=16, padding=True, layout="hf"))
    if device == "cuda":
        case = replace(case, L=37, S=41, P=19, D=64)
    data = make_inputs(case, torch.float32, device)
    t = data["tensors"]
    grad_out = data["grad_out"].transpose(1, 2).contiguous().transpose(1, 2)
    out, grads = run_with_grads(lambda **kw: prefix_attention(**kw, backend=backend), t, data["kwargs"], grad_out)
    assert not t["q"].is_contiguous() and out.transpose(1, 2).is_contiguous()
    assert grads["q"].stride() == t["q"].stride()
    assert grads["k"].stride() == t["k"].stride() and grads["v"].stride() == t["v"].stride()
    contiguous = {n: x.contiguous() for n, x in t.items()}
    want_out, want = run_with_grads(lambda **kw: prefix_attention(**kw, backend=backend), contiguous,
                                    data["kwargs"], data["grad_out"])
    assert not out.is_contiguous() and want_out.is_contiguous()
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
