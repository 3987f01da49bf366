"""The triton backend against the float64 reference: output and all five gradients.

Without a GPU these run the real kernels in Triton's interpreter (fp32, fp16; bf16 `tl.dot` is broken in the
interpreter), with one the same sweep runs on the device in fp16, bf16 and fp32 (`gpu` marker).
"""

from dataclasses import replace

import pytest
import torch
from attention_cases import BASE, SWEEP, Case, assert_matches_reference, make_inputs, run_with_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefix_kernels
from prefix_kernels.ops.dropout import draw_seed
from prefix_kernels.ops.triton.op import triton_dropout_mask

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", SWEEP, ids=Case.id)
def test_sweep_interpreter(case, dtype):
    assert_matches_reference(case, dtype, "cpu", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", SWEEP + [replace(c, B=3, L=4 * c.L + 61, S=4 * c.S + 61) for c in SWEEP[:12]],
                         ids=Case.id)
def test_sweep_gpu(case, dtype):
    assert_matches_reference(case, dtype, "cuda", "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_prefix_gradient_repeatability(deterministic):
    case = replace(BASE, B=16, L=300, S=300, P=64, D=128, Hq=8, Hkv=2)
    data = make_inputs(case, torch.bfloat16, "cuda")
    runs = [run_with_grads(lambda **kw: prefix_kernels.prefix_attention(**kw, backend="triton",
                                                                        deterministic=deterministic),
                           data["tensors"], data["kwargs"], data["grad_out"])[1] for _ in range(3)]
    if deterministic:
        for other in runs[1:]:
            for name in runs[0]:
                assert torch.equal(runs[0][name], other[name]), name
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", deterministic=deterministic)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_atomic_prefix_reduction_matches_reference():
    assert_matches_reference(replace(BASE, B=3, T=2), torch.float32, DEVICE, "triton", deterministic=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), Hkv=st.integers(1, 2), L=st.integers(1, 24),
    extra_s=st.integers(0, 12), P=st.integers(0, 24), D=st.sampled_from([16, 24, 32, 40]),
    causal=st.booleans(), padding=st.booleans(), layout=st.sampled_from(["contiguous", "hf"]),
)
def test_random_shapes(B, group, Hkv, L, extra_s, P, D, causal, padding, layout):
    case = Case(B=B, Hq=group * Hkv, Hkv=Hkv, L=L, S=L + extra_s, P=P, D=D, causal=causal, padding=padding,
                layout=layout)
    assert_matches_reference(case, torch.float32, DEVICE, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [replace(BASE, P=19, S=23, L=20), replace(BASE, B=3, T=2, causal=False,
                                                                           padding=True)], ids=Case.id)
def test_dropout_replays_through_reference(case, dtype):
    """The backward regenerates the forward's dropout mask: replaying that mask through the reference gives
    the same output and gradients."""
    p = 0.3
    data = make_inputs(case, dtype, DEVICE)
    torch.manual_seed(1234)
    out, grads = run_with_grads(lambda **kw: prefix_kernels.prefix_attention(**kw, backend="triton", dropout_p=p),
                                data["tensors"], data["kwargs"], data["grad_out"])
    torch.manual_seed(1234)
    keep = triton_dropout_mask(case.B, case.Hq, case.L, case.P, case.S, p, draw_seed(p), DEVICE)
    assert keep.shape == (case.B, case.Hq, case.L, case.P + case.S)
    ref_out, ref_grads = run_with_grads(prefix_kernels.reference_prefix_attention, data["tensors"],
                                        {**data["kwargs"], "dropout_p": p, "dropout_mask": keep},
                                        data["grad_out"], dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], atol=tol, rtol=tol, msg=name)
    # The dropout really drops: without the mask the reference differs.
    plain = prefix_kernels.reference_prefix_attention(**{n: t.double() for n, t in data["tensors"].items()},
                                                      **data["kwargs"])
    assert (plain - ref_out).abs().max() > 1e-2


def test_dropout_rate_and_seeding():
    B, Hq, L, P, S, p = 2, 3, 40, 24, 40, 0.25
    keep = triton_dropout_mask(B, Hq, L, P, S, p, seed=987654321, device=DEVICE)
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, rate
    assert torch.equal(keep, triton_dropout_mask(B, Hq, L, P, S, p, seed=987654321, device=DEVICE))
    assert not torch.equal(keep, triton_dropout_mask(B, Hq, L, P, S, p, seed=987654322, device=DEVICE))
    # Prefix and sequence columns are drawn independently per (row, head, query).
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])


def test_dropout_follows_torch_manual_seed():
    data = make_inputs(BASE, torch.float32, DEVICE)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(prefix_kernels.prefix_attention(**data["tensors"], **data["kwargs"], dropout_p=0.5,
                                                    backend="triton"))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.gpu
def test_torch_compile_traces_the_op():
    """triton_op makes the kernels visible to torch.compile: a compiled function runs, with gradients.
    (Under the interpreter wrap_triton returns the plain kernel, which fake tensors cannot trace.)"""
    data = make_inputs(BASE, torch.float32, "cuda")

    def layer(q, k, v, prefix_k, prefix_v):
        return prefix_kernels.ops.triton.op.triton_prefix_attention(
            q * 2, k, v, prefix_k, prefix_v, causal=True, key_padding_mask=None, scale=0.125, dropout_p=0.0,
            prefix_index=None, deterministic=True).sum(-1)

    compiled = torch.compile(layer, fullgraph=True)
    eager_out, eager_grads = run_with_grads(layer, data["tensors"], {}, torch.ones(BASE.B, BASE.Hq, BASE.L))
    out, grads = run_with_grads(compiled, data["tensors"], {}, torch.ones(BASE.B, BASE.Hq, BASE.L))
    torch.testing.assert_close(out, eager_out)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name])
