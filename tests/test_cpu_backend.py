"""What only the `cpu` backend (the C++ kernels in csrc/cpu) has: shapes with several of its 64-query / 64-key
blocks per row, and results independent of the number of threads.

Everything every backend shares (the sweep against the float64 oracle, dropout, determinism, compile, opcheck,
output_mask, layouts) is in test_backends.py.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import GRAD_NAMES, Case, assert_matches_reference, make_inputs, op_call, run_with_grads

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
], ids=["shared", "prefix-bank", "decode"])
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
