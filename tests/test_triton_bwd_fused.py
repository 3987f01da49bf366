"""The opt-in one-launch triton backward (PREFIX_KERNELS_TRITON_BWD=fused, kernels_bwd_fused.py): the same
gradients as the float64 oracle, bitwise repeatable, and really the fused kernel that ran."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attention_cases import BASE, Case, assert_matches_reference, make_inputs, op_call, packed_case
from prefix_kernels.ops.backends import TRITON_BWD_ENV
from prefix_kernels.ops import available_backends, prefix_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

if "triton" in available_backends(DEVICE):
    from prefix_kernels.ops.triton import launch

SEQ_KERNELS = {"prefix_attention_bwd_dq", "prefix_attention_bwd_dkdv", "prefix_attention_bwd_fused"}

# Odd shapes around BASE: GQA groups 1, 2 and 4, causal and bidirectional, L != S both ways, P = 0 and odd,
# key padding (left padding too), several prefixes, a decode step, a head dim that is not a power of two, the
# transposed layout, and the optional features (window, softcap, packed sequences; sinks reach the backward
# through the LSE only).
CASES = [
    Case(B=2, Hq=2, Hkv=2, L=17, S=23, P=5, D=24),
    Case(Hq=4, Hkv=2, L=20, S=11, P=3, causal=False),
    Case(Hq=4, Hkv=1, L=9, S=33, P=0, padding=True),
    Case(Hq=4, Hkv=1, L=9, S=33, P=0, padding=True, causal=False),
    Case(B=3, Hq=4, Hkv=2, L=9, S=12, P=7, T=2, causal=False),
    Case(B=4, T=3, padding=True),
    Case(L=20, S=40, P=3, left_pad=20),
    Case(D=80, L=9, S=9, P=37),
    Case(L=1, S=40, P=19, padding=True),
    replace(BASE, layout="hf", padding=True, S=24, L=24),
    Case(L=33, S=40, P=5, window=7),
    Case(Hq=4, Hkv=1, L=19, S=19, P=3, softcap=5.0, causal=False),
    packed_case((7, 19, 4), Hq=4, Hkv=2, P=5, T=2, window=6, softcap=5.0, sinks=True),
    packed_case((16, 1, 13), Hq=2, Hkv=2, P=0),
]


def spy_launches(monkeypatch) -> list[str]:
    """The names of the kernels launch._launch runs, in order (the launches themselves are unchanged)."""
    names = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        names.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    return names


@pytest.fixture
def fused(monkeypatch) -> list[str]:
    monkeypatch.setenv(TRITON_BWD_ENV, "fused")
    return spy_launches(monkeypatch)


def seq_kernels(names: list[str]) -> list[str]:
    return [n for n in names if n in SEQ_KERNELS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_fused_backward_matches_the_reference(fused, case, dtype):
    assert_matches_reference(case, dtype, DEVICE, "triton")
    assert seq_kernels(fused) == ["prefix_attention_bwd_fused"], fused
    assert "prefix_attention_bwd_dprefix" in fused or case.P == 0


def test_fused_backward_with_dropout(fused):
    assert_matches_reference(Case(Hq=4, Hkv=2, L=20, S=23, P=7, padding=True), torch.float32, DEVICE, "triton",
                             dropout_p=0.3, seed=1234)
    assert seq_kernels(fused) == ["prefix_attention_bwd_fused"], fused


@pytest.mark.parametrize("mode", [None, "split", ""])
def test_default_and_split_run_the_split_kernels(monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv(TRITON_BWD_ENV, raising=False)
    else:
        monkeypatch.setenv(TRITON_BWD_ENV, mode)
    names = spy_launches(monkeypatch)
    assert_matches_reference(Case(Hq=4, Hkv=2, L=20, S=11, P=3), torch.float32, DEVICE, "triton")
    assert seq_kernels(names) == ["prefix_attention_bwd_dq", "prefix_attention_bwd_dkdv"], names


def _grads(case: Case, dtype: torch.dtype, wanted: tuple[str, ...], dropout_p: float = 0.0) -> dict:
    data = make_inputs(case, dtype, DEVICE)
    leaves = {n: t.detach().requires_grad_(n in wanted) for n, t in data["tensors"].items()}
    fn = op_call("triton", dropout_p=dropout_p, seed=99) if dropout_p else prefix_attention
    kwargs = data["kwargs"] if dropout_p else dict(data["kwargs"], backend="triton")
    out = fn(**leaves, **kwargs)
    out.backward(data["grad_out"].to(out.dtype))
    return {n: leaves[n].grad for n in wanted}


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_backward_is_bitwise_repeatable_in_both_modes(monkeypatch, mode, dropout_p):
    monkeypatch.setenv(TRITON_BWD_ENV, mode)
    names = spy_launches(monkeypatch)
    case = Case(B=3, Hq=4, Hkv=1, L=21, S=26, P=9, T=2, padding=True)
    wanted = ("q", "k", "v", "prefix_k", "prefix_v")
    first, second = _grads(case, torch.float16, wanted, dropout_p), _grads(case, torch.float16, wanted, dropout_p)
    for name in wanted:
        assert torch.equal(first[name], second[name]), name
    per_run = ["prefix_attention_bwd_fused"] if mode == "fused" else ["prefix_attention_bwd_dq",
                                                                     "prefix_attention_bwd_dkdv"]
    assert seq_kernels(names) == per_run * 2, names


@pytest.mark.parametrize("wanted", [("q",), ("k", "v"), ("q", "prefix_k", "prefix_v")], ids="+".join)
def test_fused_backward_computes_only_the_wanted_gradients(monkeypatch, wanted):
    """output_mask drops a part of the fused kernel (DQ_ON / DKDV_ON): the wanted gradients are those of the
    split kernels."""
    case = Case(Hq=4, Hkv=2, L=20, S=23, P=7, padding=True)
    monkeypatch.setenv(TRITON_BWD_ENV, "split")
    split = _grads(case, torch.float32, wanted)
    monkeypatch.setenv(TRITON_BWD_ENV, "fused")
    names = spy_launches(monkeypatch)
    got = _grads(case, torch.float32, wanted)
    for name in wanted:
        torch.testing.assert_close(got[name], split[name], rtol=1e-5, atol=1e-6)
    assert seq_kernels(names) == (["prefix_attention_bwd_fused"] if {"q", "k"} & set(wanted) else []), names


def test_bad_mode_raises(monkeypatch):
    monkeypatch.setenv(TRITON_BWD_ENV, "fusedd")
    data = make_inputs(Case(L=5, S=5, P=2), torch.float32, DEVICE)
    leaves = {n: t.detach().requires_grad_() for n, t in data["tensors"].items()}
    out = prefix_attention(**leaves, **data["kwargs"], backend="triton")
    with pytest.raises(ValueError, match="PREFIX_KERNELS_TRITON_BWD.*split, fused"):
        out.backward(data["grad_out"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_backward_at_a_larger_shape(fused, dtype):
    """Several blocks of the shipped tiles in every direction, GQA 4, padding, two prefixes, D 128."""
    case = Case(B=2, Hq=8, Hkv=2, L=700, S=900, P=130, D=128, padding=True, T=2)
    assert_matches_reference(case, dtype, "cuda", "triton")
    assert seq_kernels(fused) == ["prefix_attention_bwd_fused"], fused


def test_fused_backward_at_the_shipped_tiles(fused):
    """configs.shipped_tiles(): the interpreter runs the fused kernel at its first shipped tile (and its feature
    table's with the features on), several blocks of each."""
    from prefix_kernels.ops.triton import configs

    with configs.shipped_tiles():
        assert_matches_reference(Case(Hq=4, Hkv=2, L=40, S=70, P=33, D=24, padding=True), torch.float32, DEVICE,
                                 "triton")
        assert_matches_reference(packed_case((30, 45), Hq=2, Hkv=1, P=9, window=20, softcap=5.0), torch.float32,
                                 DEVICE, "triton")
    assert seq_kernels(fused) == ["prefix_attention_bwd_fused"] * 2, fused


def test_fused_grid_has_batch_times_kv_heads_on_axis_0(monkeypatch):
    """(B * Hkv, max(query blocks, key blocks)): axis 0 is the only one past 65535 programs."""
    monkeypatch.setenv(TRITON_BWD_ENV, "fused")
    grids = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        if getattr(getattr(kernel, "fn", kernel), "__name__", "") == "prefix_attention_bwd_fused":
            grids.append(grid({"BLOCK_M": 16, "BLOCK_N": 16}))
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    assert_matches_reference(Case(B=3, Hq=4, Hkv=2, L=40, S=57, P=5, D=16), torch.float32, DEVICE, "triton")
    assert grids == [(6, 4)], grids
