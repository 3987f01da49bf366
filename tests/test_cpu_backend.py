"""What only the `cpu` backend (the C++ kernels in csrc/cpu) has: shapes with several of its 64-query / 64-key
blocks per row (with the optional features too), results independent of the number of threads, and key blocks
that a window or another packed sequence hides never being read.

Everything every backend shares (the sweep against the float64 oracle, dropout, determinism, compile, opcheck,
output_mask, layouts) is in test_backends.py.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    GRAD_NAMES,
    Case,
    assert_matches_reference,
    make_inputs,
    op_call,
    packed_case,
    run_with_grads,
)

from prefix_kernels.ops import prefix_attention, reference_prefix_attention
from prefix_kernels.ops.backends import unavailable_reason

_REASON = unavailable_reason("cpu", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

class threads:
    """Run with n intra-op threads (the C++ kernels split their work by thread count)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


CPU_CASES = [  # several 64-query / 64-key blocks per row, beyond the shared sweep
    Case(B=1, Hq=2, Hkv=2, L=1, S=1, P=0),
    Case(B=3, Hq=8, Hkv=2, L=17, S=40, P=17, D=80),
    Case(B=2, Hq=4, Hkv=1, L=70, S=70, P=17, D=96, causal=False),
    Case(B=2, Hq=4, Hkv=4, L=64, S=90, P=130, D=128),
    Case(B=3, Hq=4, Hkv=4, L=66, S=66, P=0, padding=True),
    Case(B=2, Hq=8, Hkv=2, L=33, S=50, P=17, D=64, causal=False, padding=True),
    Case(B=3, Hq=4, Hkv=2, L=65, S=65, P=17, D=64, T=3),
    Case(B=3, Hq=4, Hkv=1, L=1, S=70, P=20, D=64, T=3, padding=True),
    Case(B=2, Hq=4, Hkv=2, L=20, S=30, P=5, D=33, layout="hf"),
    Case(B=1, Hq=2, Hkv=1, L=130, S=130, P=1, D=64),
    Case(B=2, Hq=2, Hkv=2, L=8, S=0, P=9),
    Case(B=2, Hq=4, Hkv=2, L=20, S=140, P=3, left_pad=128, padding=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=Case.id)
def test_multi_block_shapes(case, dtype):
    assert_matches_reference(case, dtype, "cpu", "cpu")


CPU_FEATURE_CASES = [  # windows, caps, sinks and packed sequences across several blocks
    Case(B=2, Hq=4, Hkv=2, L=150, S=150, P=17, D=64, window=40),
    Case(B=2, Hq=4, Hkv=1, L=70, S=200, P=3, D=32, window=100, causal=False, padding=True),
    Case(B=1, Hq=2, Hkv=2, L=130, S=130, P=70, D=32, window=65, softcap=1.0, sinks=True),
    Case(B=3, Hq=4, Hkv=2, L=1, S=150, P=20, D=64, T=3, window=70, sinks=True, padding=True),
    Case(B=2, Hq=2, Hkv=2, L=100, S=60, P=0, D=32, window=20, sinks=True, padding=True),
    packed_case((70, 0, 130, 5), Hq=4, Hkv=2, P=9, D=32, T=2, window=50, softcap=2.0, sinks=True),
    packed_case((65, 64, 1, 100), Hq=2, Hkv=1, P=0, D=32, causal=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CPU_FEATURE_CASES, ids=Case.id)
def test_multi_block_features(case, dtype):
    assert_matches_reference(case, dtype, "cpu", "cpu")


@pytest.mark.parametrize("T", [0, 3])
@pytest.mark.parametrize("Hq,L", [(4, 33), (6, 2)], ids=["query-blocks", "gqa-group-stacked"])
def test_dropout_replay_in_both_forward_layouts(T, Hq, L):
    """L = 33 with 2 heads per KV head tiles each head's queries; L = 2 with 3 stacks the group's 6 queries in
    one tile (decode-like; one thread, so that there are enough tasks to stack)."""
    case = Case(B=2, Hq=Hq, Hkv=2, L=L, S=40, P=9, D=32, padding=True, T=T)
    with threads(1):
        assert_matches_reference(case, torch.float32, "cpu", "cpu", dropout_p=0.3, seed=2**40 + 99)


# ---- thread count ------------------------------------------------------------------------------------------


def grads_with_threads(n: int, case: Case, dtype: torch.dtype, dropout_p: float = 0.0):
    data = make_inputs(case, dtype, "cpu")
    with threads(n):
        return run_with_grads(op_call("cpu", dropout_p=dropout_p, seed=7), data["tensors"], data["kwargs"],
                              data["grad_out"])


def assert_bitwise(a, b):
    assert torch.equal(a[0], b[0]), "out"
    for name in GRAD_NAMES:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("case", [
    Case(B=3, Hq=4, Hkv=2, L=40, S=70, P=19, D=16, padding=True),
    Case(B=3, Hq=4, Hkv=2, L=40, S=70, P=19, D=16, padding=True, T=3),
    Case(B=3, Hq=8, Hkv=2, L=2, S=70, P=19, D=16, padding=True),
    Case(B=3, Hq=4, Hkv=2, L=100, S=130, P=19, D=16, padding=True, window=40, softcap=1.5, sinks=True),
    packed_case((70, 0, 90, 3), Hq=4, Hkv=2, P=19, D=16, T=2, window=30, sinks=True),
], ids=["shared", "prefix-bank", "decode", "features", "packed"])
def test_independent_of_the_thread_count(case):
    """The prefix gradients are reduced over the batch in a fixed order whatever the number of threads. With
    B * Hkv = 6 (chunk, KV head) tasks, 1-3 threads take the fused one-pass backward and 8 the three passes,
    and a decode-like forward stacks a GQA group's queries with up to 6 threads, not with 8."""
    results = [grads_with_threads(n, case, torch.float32) for n in (1, 2, 3, 8)]
    for other in results[1:]:
        assert_bitwise(results[0], other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_block_gradients_independent_of_thread_count(dtype):
    case = Case(B=5, Hq=4, Hkv=2, L=130, S=140, P=70, D=64, T=3)
    assert_bitwise(grads_with_threads(1, case, dtype), grads_with_threads(2, case, dtype))


def test_thread_count_with_dropout_and_bf16():
    # 6 (chunk, KV head) tasks: with 8 threads the three-pass backward, against the fused one with 1.
    case = Case(B=3, Hq=4, Hkv=2, L=20, S=33, P=8, D=16, padding=True)
    assert_bitwise(grads_with_threads(1, case, torch.bfloat16, 0.1), grads_with_threads(8, case, torch.bfloat16, 0.1))


# ---- blocks that are never read ----------------------------------------------------------------------------


def _poisoned_run(case: Case, poison: slice, n_threads: int):
    """The cpu backend on k and v that are NaN / inf at sequence positions `poison`, and the float64 oracle on
    the clean values: (out, grads) of each."""
    data = make_inputs(case, torch.float32, "cpu")
    t, kw = dict(data["tensors"]), data["kwargs"]
    want = run_with_grads(reference_prefix_attention, t, kw, data["grad_out"], dtype=torch.float64)
    t["k"], t["v"] = t["k"].clone(), t["v"].clone()
    t["k"][:, :, poison] = float("nan")
    t["v"][:, :, poison] = float("inf")
    with threads(n_threads):
        got = run_with_grads(lambda **a: prefix_attention(**a, backend="cpu"), t, kw, data["grad_out"])
    return got, want


def _assert_close(got, want, name):
    assert torch.isfinite(got).all(), f"{name} is not finite"
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("n_threads", [1, 8])
@pytest.mark.parametrize("case,poison", [
    # query 0 sits at key 256 and sees keys 193.. (and the last query the keys up to 319 when bidirectional):
    # blocks 0-2 ([0, 192)) are hidden from every query
    (Case(B=2, Hq=4, Hkv=2, L=64, S=320, P=5, D=32, window=64), 192),
    (Case(B=2, Hq=4, Hkv=2, L=64, S=320, P=5, D=32, window=64, causal=False, softcap=2.0), 192),
    # decode with the GQA group stacked: the query sees keys 184..199, blocks 0 and 1 nothing
    (Case(B=2, Hq=4, Hkv=1, L=1, S=200, P=5, D=32, window=16, sinks=True), 128),
], ids=lambda x: x.id() if isinstance(x, Case) else str(x))
def test_a_window_never_reads_the_key_blocks_it_hides(case, poison, n_threads):
    """K and V blocks that no query's window reaches are NaN / inf: were any of them read (even multiplied by a
    zero probability) the output or a gradient would not be finite. Both backward schedules (fused with one
    thread, the three passes with eight)."""
    (out, grads), (want_out, want_grads) = _poisoned_run(case, slice(0, poison), n_threads)
    _assert_close(out, want_out, "out")
    for name in ("q", "prefix_k", "prefix_v") + (("sinks",) if case.sinks else ()):
        _assert_close(grads[name], want_grads[name], name)
    for name in ("k", "v"):
        assert (grads[name][:, :, :poison] == 0).all(), name
        _assert_close(grads[name][:, :, poison:], want_grads[name][:, :, poison:], name)


@pytest.mark.parametrize("n_threads", [1, 8])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_packed_sequences_never_read_each_others_keys(causal, n_threads):
    """The middle sequence's keys and values are NaN / inf (its own outputs are NaN, as they should be): the
    sequences around it, whose block boundaries do not fall on multiples of 64 of the packed row, and the
    prefixes only they use, stay finite and exact."""
    case = packed_case((70, 50, 90), Hq=4, Hkv=2, P=5, D=32, T=3, causal=causal, window=80)
    (out, grads), (want_out, want_grads) = _poisoned_run(case, slice(70, 120), n_threads)
    # prefix_index is [2, 1, 0]: the middle sequence alone uses prefix 1
    for seq in (slice(0, 70), slice(120, 210)):
        _assert_close(out[:, :, seq], want_out[:, :, seq], "out")
        for name in ("q", "k", "v"):
            _assert_close(grads[name][:, :, seq], want_grads[name][:, :, seq], name)
    for name in ("prefix_k", "prefix_v"):
        for t in (0, 2):
            _assert_close(grads[name][t], want_grads[name][t], name)
    assert not torch.isfinite(out[:, :, 70:120]).any()
