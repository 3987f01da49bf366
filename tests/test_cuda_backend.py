"""The `cuda` backend (CUDA kernels in csrc/cuda) against the float64 reference: output and all five gradients.

GPU only (`gpu` marker; the whole module skips without a GPU or without the CUDA kernels in
prefix_kernels._C). Criterion (flash-attention's, tests/attention_cases.py): the backend's max error against the
float64 reference is at most twice the error of the reference run in the same dtype, plus a small floor.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import BASE, GRAD_NAMES, SWEEP, Case, assert_matches_reference, make_inputs, run_with_grads

import prefix_kernels
from prefix_kernels.ops import cpp


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return cpp.unavailable_reason("cuda")


_REASON = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# On top of the shared sweep (head dims 32..256, P = 0 / 1 / P > S, decode, GQA / MQA, padding, T = 3, the
# transposed "hf" layout): P = 17, odd head dims, and shapes with several query / key / prefix blocks
# (the kernels' tiles are 16..64 rows), including rows that see no key and causal S < L.
EXTRA = [
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SWEEP + EXTRA, ids=Case.id)
def test_matches_reference(case, dtype):
    assert_matches_reference(case, dtype, DEVICE, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse_and_empty_rows(dtype):
    """lse is the natural-log logsumexp of the scaled visible scores; a row with no visible key gets +inf,
    zeros out and zero gradients (P = 0, fully padded row 0)."""
    case = replace(BASE, P=0, padding=True, L=19, S=23)
    data = make_inputs(case, dtype, DEVICE)
    t, kw = data["tensors"], data["kwargs"]
    out, lse = cpp.cpp_forward_with_lse(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], **kw)
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.L)
    assert torch.isinf(lse[0]).all() and (lse[0] > 0).all() and (out[0] == 0).all()
    keys = t["k"].double().repeat_interleave(case.Hq // case.Hkv, dim=1)
    scores = t["q"].double() @ keys.transpose(-1, -2) * case.D**-0.5
    visible = prefix_kernels.ops.masks.visible_keys(case.B, case.L, case.S, case.P, causal=case.causal,
                                                    key_padding_mask=kw["key_padding_mask"], device=DEVICE)
    want = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(lse))
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert (lse.double()[finite] - want[finite]).abs().max().item() < tol
    _, grads = run_with_grads(lambda **k: prefix_kernels.prefix_attention(**k, backend="cuda"), t, kw, data["grad_out"])
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["q"][0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_prefix_gradients_are_deterministic(dtype):
    """The prefix gradients are reduced in a fixed order (no atomics): two backward passes agree bitwise."""
    case = replace(BASE, B=9, L=150, S=150, P=64, D=64, Hq=8, Hkv=2, padding=True)
    data = make_inputs(case, dtype, DEVICE)
    fn = lambda **kw: prefix_kernels.prefix_attention(**kw, backend="cuda")  # noqa: E731
    _, first = run_with_grads(fn, data["tensors"], data["kwargs"], data["grad_out"])
    _, second = run_with_grads(fn, data["tensors"], data["kwargs"], data["grad_out"])
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [replace(BASE, L=23, S=31, P=17),
                                  replace(BASE, B=4, T=3, padding=True, causal=False, L=40, S=45, P=33, D=64)],
                         ids=Case.id)
def test_dropout_replays_through_reference(case, dtype):
    """Forward and backward draw the dropout mask of csrc/philox.h: replaying cpp_dropout_mask(seed) through
    the reference gives the same output and gradients."""
    p, seed = 0.3, 1234567890123
    data = make_inputs(case, dtype, DEVICE)
    kw = data["kwargs"]

    def fn(q, k, v, prefix_k, prefix_v, **_):
        out, _lse = cpp.cpp_forward_with_lse(q, k, v, prefix_k, prefix_v, causal=kw["causal"],
                                             key_padding_mask=kw.get("key_padding_mask"),
                                             prefix_index=kw.get("prefix_index"), dropout_p=p, seed=seed)
        return out

    keep = cpp.cpp_dropout_mask(case.B, case.Hq, case.L, case.P, case.S, p, seed).to(DEVICE)
    assert 0.6 < keep.float().mean().item() < 0.8
    ref_kw = {**kw, "dropout_p": p, "dropout_mask": keep}
    exact_out, exact = run_with_grads(prefix_kernels.reference_prefix_attention, data["tensors"], ref_kw,
                                      data["grad_out"], dtype=torch.float64)
    same_out, same = run_with_grads(prefix_kernels.reference_prefix_attention, data["tensors"], ref_kw,
                                    data["grad_out"])
    out, grads = run_with_grads(fn, data["tensors"], {}, data["grad_out"])
    floor = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}[dtype]
    for name, got, ref, want in [("out", out, same_out, exact_out)] + [
        (n, grads[n], same[n], exact[n]) for n in GRAD_NAMES
    ]:
        err = (got.double() - want).abs().max().item()
        ref_err = (ref.double() - want).abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3e} > 2 x {ref_err:.3e} + {floor:.0e}"


def test_non_contiguous_inputs_and_prefix_not_copied_per_row():
    """Strided q / k / v / grad_out give the same result as contiguous copies."""
    case = replace(BASE, layout="hf", L=37, S=41, P=19, D=64)
    data = make_inputs(case, torch.float16, DEVICE)
    fn = lambda **kw: prefix_kernels.prefix_attention(**kw, backend="cuda")  # noqa: E731
    contiguous = {n: t.contiguous() for n, t in data["tensors"].items()}
    assert not data["tensors"]["q"].is_contiguous()
    out_a, grads_a = run_with_grads(fn, data["tensors"], data["kwargs"], data["grad_out"].transpose(1, 2)
                                    .contiguous().transpose(1, 2))
    out_b, grads_b = run_with_grads(fn, contiguous, data["kwargs"], data["grad_out"])
    assert torch.equal(out_a, out_b)
    for name in GRAD_NAMES:
        assert torch.equal(grads_a[name], grads_b[name]), name
