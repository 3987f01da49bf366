"""The opt-in atomic triton backward (PREFIX_KERNELS_TRITON_BWD=atomic, FlashAttention-2's): `bwd_dkdv` and
`bwd_dprefix` add dq with fp32 atomics and no `bwd_dq` runs. The same gradients as the float64 oracle, only
for deterministic=False calls, and really those kernels that ran."""

from __future__ import annotations

import pytest
import torch

from attention_cases import Case, assert_matches_reference, make_inputs, packed_case
from prefix_kernels.ops.backends import TRITON_BWD_ENV
from prefix_kernels.ops import available_backends, prefix_attention
from test_triton_bwd_fused import CASES, DEVICE, seq_kernels, spy_launches

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

ATOMIC_KERNELS = ["prefix_attention_bwd_dkdv"]


@pytest.fixture
def atomic(monkeypatch) -> list[str]:
    monkeypatch.setenv(TRITON_BWD_ENV, "atomic")
    return spy_launches(monkeypatch)


def expected_kernels(case: Case) -> list[str]:
    # bwd_dkdv runs when there are sequence keys; bwd_dprefix adds the prefix keys' dq when there is a prefix.
    return ATOMIC_KERNELS if case.S > 0 else []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_atomic_backward_matches_the_reference(atomic, case, dtype):
    assert_matches_reference(case, dtype, DEVICE, "triton", deterministic=False)
    assert seq_kernels(atomic) == expected_kernels(case), atomic
    assert ("prefix_attention_bwd_dprefix" in atomic) == (case.P > 0), atomic


def test_atomic_backward_with_dropout(atomic):
    assert_matches_reference(Case(Hq=4, Hkv=2, L=20, S=23, P=7, padding=True), torch.float32, DEVICE, "triton",
                             dropout_p=0.3, seed=1234, deterministic=False)
    assert seq_kernels(atomic) == ATOMIC_KERNELS, atomic


def test_atomic_backward_at_the_shipped_tiles(atomic):
    """The interpreter runs bwd_dkdv and bwd_dprefix with ATOMIC_DQ at their first shipped tiles (and their
    feature tables' with the features on), several blocks of each, so that the atomics' row offsets are those
    of a GPU launch."""
    from prefix_kernels.ops.triton import configs

    with configs.shipped_tiles():
        assert_matches_reference(Case(Hq=4, Hkv=2, L=70, S=90, P=70, D=24, padding=True, T=2), torch.float32,
                                 DEVICE, "triton", deterministic=False)
        assert_matches_reference(packed_case((30, 45), Hq=2, Hkv=1, P=9, T=2, window=20, softcap=5.0),
                                 torch.float32, DEVICE, "triton", deterministic=False)
    assert seq_kernels(atomic) == ATOMIC_KERNELS * 2, atomic


def _grads(case: Case, wanted: tuple[str, ...], deterministic: bool) -> dict:
    data = make_inputs(case, torch.float32, DEVICE)
    leaves = {n: t.detach().requires_grad_(n in wanted) for n, t in data["tensors"].items()}
    out = prefix_attention(**leaves, **data["kwargs"], backend="triton", deterministic=deterministic)
    out.backward(data["grad_out"].to(out.dtype))
    return {n: leaves[n].grad for n in wanted}


@pytest.mark.parametrize("wanted", [("q",), ("k", "v"), ("q", "prefix_k", "prefix_v"), ("prefix_k", "prefix_v")],
                         ids="+".join)
def test_atomic_backward_computes_the_wanted_gradients(monkeypatch, wanted):
    """A dq alone still needs bwd_dkdv and bwd_dprefix (they hold the atomic backward's dq); without dq the
    kernels add none, and the gradients are those of the split kernels."""
    case = Case(Hq=4, Hkv=2, L=20, S=23, P=7, padding=True)
    monkeypatch.setenv(TRITON_BWD_ENV, "split")
    split = _grads(case, wanted, deterministic=True)
    monkeypatch.setenv(TRITON_BWD_ENV, "atomic")
    names = spy_launches(monkeypatch)
    got = _grads(case, wanted, deterministic=False)
    for name in wanted:
        torch.testing.assert_close(got[name], split[name], rtol=1e-5, atol=1e-6)
    assert seq_kernels(names) == (ATOMIC_KERNELS if {"q", "k"} & set(wanted) else []), names
    assert ("prefix_attention_bwd_dprefix" in names) == bool({"q", "prefix_k"} & set(wanted)), names


def test_atomic_mode_refuses_a_deterministic_call(monkeypatch):
    """deterministic=True promises a bitwise repeatable backward, which dq's atomics cannot keep: the backward
    raises before any kernel runs, naming the variable and the argument."""
    monkeypatch.setenv(TRITON_BWD_ENV, "atomic")
    names = spy_launches(monkeypatch)
    data = make_inputs(Case(L=5, S=5, P=2), torch.float32, DEVICE)
    leaves = {n: t.detach().requires_grad_() for n, t in data["tensors"].items()}
    out = prefix_attention(**leaves, **data["kwargs"], backend="triton")
    names.clear()  # the forward's launches
    with pytest.raises(ValueError, match="PREFIX_KERNELS_TRITON_BWD=atomic.*deterministic=False"):
        out.backward(data["grad_out"])
    assert names == [], names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_atomic_backward_at_a_larger_shape(atomic, dtype):
    """Several blocks of the shipped tiles in every direction, GQA 4, padding, two prefixes, D 128."""
    case = Case(B=2, Hq=8, Hkv=2, L=700, S=900, P=130, D=128, padding=True, T=2)
    assert_matches_reference(case, dtype, "cuda", "triton", deterministic=False)
    assert seq_kernels(atomic) == ATOMIC_KERNELS, atomic
