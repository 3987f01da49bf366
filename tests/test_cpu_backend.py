"""The `cpu` backend (C++ kernels in csrc/cpu) against the float64 reference (DESIGN.md "The op").

Criterion (flash-attention's): the backend's max abs error against the float64 reference is at most twice the
error of the reference itself run in the same dtype, plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

import prefix_kernels
from attention_cases import SWEEP, Case, assert_matches_reference, make_inputs, run_with_grads

from prefix_kernels import prefix_attention, reference_prefix_attention
from prefix_kernels.ops import cpp
from prefix_kernels.ops.dropout import draw_seed
from prefix_kernels.ops.masks import visible_keys

_REASON = cpp.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

CPU_CASES = [  # larger than the interpreter sweep: several 64-query / 64-key blocks per row
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
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SWEEP + CPU_CASES, ids=Case.id)
def test_matches_reference(case, dtype):
    assert_matches_reference(case, dtype, "cpu", "cpu")


def cpu_grads(data, **kwargs):
    return run_with_grads(lambda **kw: prefix_attention(**kw, backend="cpu"), data["tensors"],
                          {**data["kwargs"], **kwargs}, data["grad_out"])


def test_lse():
    case = Case(B=2, Hq=4, Hkv=2, L=10, S=12, P=3, D=16, padding=True)
    data = make_inputs(case, torch.float32, "cpu")
    q, k, v, pk, pv = data["tensors"].values()
    mask = data["kwargs"]["key_padding_mask"]
    _, lse = cpp.cpp_forward_with_lse(q, k, v, pk, pv, causal=True, key_padding_mask=mask, prefix_index=None)
    keys = torch.cat([pk.expand(2, -1, -1, -1), k], 2).repeat_interleave(2, 1)
    scores = q @ keys.transpose(-1, -2) * 16**-0.5
    vis = visible_keys(2, 10, 12, 3, causal=True, key_padding_mask=mask, device="cpu")
    expected = torch.logsumexp(scores.masked_fill(~vis, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)


# ---- torch.library registration ----------------------------------------------------------------------------


def _op_args(requires_grad):
    data = make_inputs(Case(B=2, Hq=4, Hkv=2, L=5, S=7, P=3, D=8, padding=True), torch.float32, "cpu")
    tensors = [t.contiguous().requires_grad_(requires_grad) for t in data["tensors"].values()]
    return tensors, data["kwargs"]["key_padding_mask"]


def test_opcheck_fwd():
    tensors, mask = _op_args(True)
    torch.library.opcheck(torch.ops.prefix_kernels.cpp_fwd.default, (*tensors, mask, None, True, 0.35, 0.0, 0))


def test_opcheck_bwd():
    tensors, mask = _op_args(False)
    out, lse = torch.ops.prefix_kernels.cpp_fwd(*tensors, mask, None, True, 0.35, 0.0, 0)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.prefix_kernels.cpp_bwd.default,
                          (grad, *tensors, out, lse, mask, None, True, 0.35, 0.0, 0))


def test_opcheck_dropout_mask():
    torch.library.opcheck(torch.ops.prefix_kernels.cpp_dropout_mask.default, (2, 3, 4, 5, 6, 0.25, 7))


def test_torch_compile_traces_the_op():
    """The C++ op is opaque to torch.compile (fake implementation + autograd): a compiled layer matches eager."""
    data = make_inputs(Case(padding=True), torch.float32, "cpu")

    def layer(q, k, v, prefix_k, prefix_v, key_padding_mask, causal):
        return prefix_attention(q * 2, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask,
                                causal=causal, backend="cpu").sum(-1)

    grad = torch.ones(2, 4, 17)
    eager_out, eager_grads = run_with_grads(layer, data["tensors"], data["kwargs"], grad)
    compiled = torch.compile(layer, backend="aot_eager")
    out, grads = run_with_grads(compiled, data["tensors"], data["kwargs"], grad)
    torch.testing.assert_close(out, eager_out)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name])


# ---- dropout -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, 3])
@pytest.mark.parametrize("Hq,L", [(4, 33), (6, 2)], ids=["query-blocks", "gqa-group-stacked"])
def test_dropout_replays_through_reference(T, Hq, L):
    """L = 33 with 2 heads per KV head tiles each head's queries; L = 2 with 3 stacks the group's 6 queries in
    one tile (decode-like; with one thread, so that there are enough tasks to stack)."""
    p = 0.3
    case = Case(B=2, Hq=Hq, Hkv=2, L=L, S=40, P=9, D=32, padding=True, T=T)
    data = make_inputs(case, torch.float32, "cpu")
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got_out, got = cpu_grads(data, dropout_p=p)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(123)  # the wrapper draws its seed from torch's generator
    mask = cpp.cpp_dropout_mask(case.B, case.Hq, case.L, case.P, case.S, p, draw_seed(p))
    want_out, want = run_with_grads(reference_prefix_attention, data["tensors"],
                                    {**data["kwargs"], "dropout_p": p, "dropout_mask": mask}, data["grad_out"],
                                    dtype=torch.float64)
    torch.testing.assert_close(got_out.double(), want_out, atol=1e-4, rtol=1e-4)
    for name in got:
        torch.testing.assert_close(got[name].double(), want[name], atol=1e-4, rtol=1e-4, msg=name)


def test_dropout_keep_rate_and_seeds():
    p = 0.25
    mask = cpp.cpp_dropout_mask(4, 8, 64, 16, 64, p, 2**40 + 7)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(mask, cpp.cpp_dropout_mask(4, 8, 64, 16, 64, p, 2**40 + 8))
    assert cpp.cpp_dropout_mask(1, 1, 4, 0, 4, 0.0, 3).all()


def test_dropout_mask_is_the_triton_mask():
    """Every backend draws the same dropout mask for the same seed (Triton's Philox, bit for bit)."""
    if "triton" not in prefix_kernels.available_backends("cpu"):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    from prefix_kernels.ops.triton.op import triton_dropout_mask

    seed = 2**40 + 12345
    torch.testing.assert_close(cpp.cpp_dropout_mask(2, 3, 19, 5, 21, 0.3, seed),
                               triton_dropout_mask(2, 3, 19, 5, 21, 0.3, seed, "cpu"))


# ---- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_independent_of_thread_count(dtype):
    data = make_inputs(Case(B=5, Hq=4, Hkv=2, L=130, S=140, P=70, D=64, T=3), dtype, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_grads(data)
        torch.set_num_threads(2)
        two = cpu_grads(data)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    for name in one[1]:
        assert torch.equal(one[1][name], two[1][name]), name


def test_dispatch_picks_cpu():
    assert "cpu" in prefix_kernels.available_backends("cpu")
    assert cpp.unavailable_reason("cpu") is None
    if not torch.cuda.is_available():
        assert cpp.unavailable_reason("cuda") is not None
