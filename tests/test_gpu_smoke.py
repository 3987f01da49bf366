"""A compact bf16 smoke matrix on the GPU (`gpu` marker), what benchmarks/gpu_check.sh runs instead of the long
LARGE sweep of test_backends.py: about twenty cases covering the tiles the benchmarks use (D 64 and 128, the
Llama GQA shape and the NLU shape scaled down in B and L), causal and bidirectional, key padding, several
prefixes (T), P = 0, decode, L != S, left padding, the hf layout, dropout (replayed by the oracle), the atomic
(deterministic=False) prefix reduction, and large logits, each against the float64 oracle with
flash-attention's criterion (attention_cases.assert_matches_reference), for the triton and cuda backends.

Without CUDA the `gpu` tests are skipped (conftest.py); the same matrix runs on CPU with the C++ `cpu` backend
(test_smoke_matrix_on_the_cpu_backend, heads and lengths cut by 4), so that the cases run everywhere.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import BASE, Case, assert_matches_reference

from prefix_kernels.ops import available_backends, prefix_attention, reference_prefix_attention
from prefix_kernels.ops.backends import unavailable_reason

LLAMA = replace(BASE, B=2, Hq=32, Hkv=8, L=192, S=192, P=64, D=128, causal=True)  # Llama-8B heads, B and L cut
NLU = replace(BASE, B=4, Hq=12, Hkv=12, L=128, S=128, P=128, D=64, causal=False)  # P-Tuning v2 NLU, B cut

# (case, dropout_p, deterministic)
SMOKE = [
    (LLAMA, 0.0, True),
    (replace(LLAMA, causal=False), 0.0, True),
    (replace(LLAMA, padding=True), 0.0, True),
    (replace(LLAMA, L=64, S=320), 0.0, True),  # chunked prefill: L < S
    (replace(LLAMA, L=150, S=70), 0.0, True),  # L > S: rows that see only the prefix
    (replace(LLAMA, P=0), 0.0, True),
    (replace(LLAMA, P=0, causal=False, padding=True), 0.0, True),
    (replace(LLAMA, L=1, S=1000, B=4), 0.0, True),  # decode
    (replace(LLAMA, layout="hf", left_pad=7), 0.0, True),
    (replace(LLAMA, B=6, T=3, padding=True), 0.0, True),
    (NLU, 0.0, True),
    (replace(NLU, causal=True), 0.0, True),
    (replace(NLU, padding=True), 0.0, True),
    (replace(NLU, B=6, T=2, P=32), 0.0, True),
    (replace(NLU, P=0, padding=True), 0.0, True),
    (replace(NLU, L=1, S=300, B=8, causal=True), 0.0, True),  # decode at D 64
    (replace(NLU, L=100, S=130, layout="hf"), 0.0, True),
    (replace(LLAMA, padding=True), 0.2, True),  # dropout, D 128
    (replace(NLU, padding=True, B=6, T=2), 0.2, True),  # dropout, D 64, several prefixes
    (replace(LLAMA, B=4, T=2), 0.0, False),  # the atomic prefix reduction
    (replace(NLU, B=8), 0.0, False),
]
SEED = 2**40 + 99


def _id(entry) -> str:
    case, p, deterministic = entry
    return case.id() + (f"-drop{p:g}" if p else "") + ("" if deterministic else "-atomic")


def _run(entry, dtype, device, backend):
    case, p, deterministic = entry
    assert_matches_reference(case, dtype, device, backend, dropout_p=p, seed=SEED if p else None,
                             deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", SMOKE, ids=_id)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_smoke_matrix_bf16(backend, entry):
    reason = unavailable_reason(backend, "cuda")
    assert reason is None, reason
    _run(entry, torch.bfloat16, "cuda", backend)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_logits_bf16(backend, D):
    """|scale * q.k| in the thousands, one key dominating each row: finite output and gradients, close to the
    float64 oracle on the same bf16 inputs."""
    reason = unavailable_reason(backend, "cuda")
    assert reason is None, reason
    _large_logits(backend, "cuda", torch.bfloat16, D)


def _large_logits(backend, device, dtype, D):
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, L, S, P = 2, 8, 2, 96, 96, 64
    shapes = dict(q=(B, Hq, L, D), k=(B, Hkv, S, D), v=(B, Hkv, S, D), prefix_k=(Hkv, P, D), prefix_v=(Hkv, P, D))
    t = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    for n in ("q", "k", "prefix_k"):
        t[n] = t[n] * 12
    t = {n: x.to(dtype=dtype, device=device) for n, x in t.items()}
    want = reference_prefix_attention(**{n: x.double() for n, x in t.items()}, causal=True)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in t.items()}
    out = prefix_attention(**leaves, causal=True, backend=backend)
    out.backward(torch.randn(out.shape, generator=g).to(dtype=dtype, device=device))
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in leaves.values())
    assert (out.double() - want).abs().max().item() <= 6e-2


def _cpu_sized(entry):
    """The case with a quarter of the heads and of L / S (at least 1), B at most max(2, T): seconds on 2 cores."""
    case, p, deterministic = entry
    case = replace(case, B=min(case.B, max(2, case.T)), Hq=case.Hq // 4, Hkv=max(1, case.Hkv // 4),
                   L=max(1, case.L // 4), S=max(1, case.S // 4), left_pad=min(case.left_pad, 3))
    return case, p, deterministic


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ cpu backend is not built")
@pytest.mark.parametrize("entry", SMOKE, ids=_id)
def test_smoke_matrix_on_the_cpu_backend(entry):
    _run(_cpu_sized(entry), torch.bfloat16, "cpu", "cpu")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ cpu backend is not built")
def test_large_logits_on_the_cpu_backend():
    _large_logits("cpu", "cpu", torch.bfloat16, 64)


def test_the_matrix_covers_what_the_benchmarks_use():
    cases = [c for c, _, _ in SMOKE]
    assert 18 <= len(SMOKE) <= 24
    assert {c.D for c in cases} == {64, 128}
    assert any(c.Hq == 32 and c.Hkv == 8 for c in cases) and any(c.Hq == c.Hkv == 12 for c in cases)
    assert {c.causal for c in cases} == {True, False} and any(c.padding for c in cases)
    assert any(c.P == 0 for c in cases) and any(c.L == 1 for c in cases) and any(c.L != c.S and c.L > 1 for c in cases)
    assert any(c.T for c in cases) and any(p for _, p, _ in SMOKE) and not all(d for _, _, d in SMOKE)
    assert isinstance(cases[0], Case)
