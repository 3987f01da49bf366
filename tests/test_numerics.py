"""Numerics under stress, every backend: huge logits, fully padded rows, P = 0 with fully masked rows, NaN/inf,
a 16k-key sequence on the CPU op, and invariance under a permutation of the batch.

The triton backend runs in Triton's interpreter without a GPU, so its shapes stay tiny here."""

from __future__ import annotations

import pytest
import torch
from attention_cases import target_dtypes, targets

from prefix_kernels.ops import available_backends, prefix_attention, reference_prefix_attention

TARGETS = targets()  # reference, cpu, triton (interpreted on CPU tensors); with a GPU also those on CUDA


def rand(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def inputs(B=2, Hq=2, Hkv=1, L=5, S=6, P=3, D=16, dtype=torch.float32, seed=0, device="cpu"):
    def r(*shape, offset):
        return rand(*shape, seed=seed + offset, dtype=dtype, device=device)

    return dict(q=r(B, Hq, L, D, offset=0), k=r(B, Hkv, S, D, offset=1), v=r(B, Hkv, S, D, offset=2),
                prefix_k=r(Hkv, P, D, offset=3), prefix_v=r(Hkv, P, D, offset=4))


def oracle(t, **kw):
    return reference_prefix_attention(**{n: x.double() for n, x in t.items()}, **kw)


def fwd_bwd(backend, t, **kw):
    leaves = {n: x.detach().clone().requires_grad_() for n, x in t.items()}
    out = prefix_attention(**leaves, backend=backend, **kw)
    g = rand(*out.shape, seed=99, dtype=out.dtype, device=out.device)
    out.backward(g)
    return out.detach(), {n: x.grad for n, x in leaves.items()}


# ---- large logits -----------------------------------------------------------------------------------------

LARGE_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("backend,device,dtype", target_dtypes())
def test_large_logits_do_not_overflow(backend, device, dtype):
    """|scale * q.k| up to ~1e4: the online softmax subtracts the running max, so nothing overflows, and
    the result matches the float64 oracle on the same (rounded) inputs."""
    D = 16
    t = inputs(D=D, P=4, dtype=torch.float32, device=device)
    # q.k ~ 10 * 10 * D * N(0,1)-ish: scale * q.k reaches several thousand; one key dominates each row.
    t["q"], t["k"], t["prefix_k"] = t["q"] * 40, t["k"] * 40, t["prefix_k"] * 40
    t = {n: x.to(dtype) for n, x in t.items()}
    scale = D ** -0.5
    logits = torch.cat([torch.einsum("bhld,hpd->bhlp", t["q"].double(), t["prefix_k"].double().repeat(2, 1, 1)),
                        torch.einsum("bhld,bhsd->bhls", t["q"].double(), t["k"].double().repeat(1, 2, 1, 1))],
                       -1) * scale
    assert logits.abs().max() > 2e3 and logits.abs().max() < 1.5e4
    want = oracle(t, causal=True)
    out, grads = fwd_bwd(backend, t, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    assert (out.double() - want).abs().max() <= LARGE_TOL[dtype]


@pytest.mark.parametrize("backend,device,dtype", target_dtypes())
def test_logits_of_1e4_exactly_pick_the_winning_key(backend, device, dtype):
    """scale * q.k = +1e4 on one prefix key and -1e4 elsewhere: the output is that key's value exactly."""
    D = 16
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 100.0
    pk = torch.zeros(1, 2, D)
    pk[0, 0, 0], pk[0, 1, 0] = 100.0, -100.0  # q.pk = +-1e4, scale = 1
    k = torch.full((1, 1, 3, D), 0.0)
    k[..., 0] = -100.0
    pv = torch.arange(2 * D, dtype=torch.float32).view(1, 2, D)
    v = torch.randn(1, 1, 3, D)
    args = [x.to(dtype=dtype, device=device) for x in (q, k, v, pk, pv)]
    out = prefix_attention(*args, scale=1.0, causal=False, backend=backend)
    assert torch.equal(out[0, 0, 0].float().cpu(), pv[0, 0]), out


# ---- padding and empty rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", TARGETS)
def test_fully_padded_sequence_row_attends_to_the_prefix_only(backend, device):
    t = inputs(B=3, P=3, device=device)
    mask = torch.ones(3, 6, dtype=torch.bool, device=device)
    mask[1] = False  # row 1: no real key, only the prefix
    kw = dict(causal=True, key_padding_mask=mask)
    out, grads = fwd_bwd(backend, t, **kw)
    want = oracle(t, **kw)
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max() < 1e-5
    # the padded keys of row 1 get no gradient, the prefix does
    assert grads["k"][1].abs().max() == 0 and grads["v"][1].abs().max() == 0
    assert grads["prefix_k"].abs().max() > 0
    # row 1 equals attention over the prefix alone
    alone = prefix_attention(t["q"][1:2], t["k"][1:2, :, :0], t["v"][1:2, :, :0], t["prefix_k"], t["prefix_v"],
                             causal=False, backend=backend)
    assert (out[1] - alone[0]).abs().max() < 1e-6


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_no_prefix_and_fully_masked_rows_give_zeros(backend, device, causal):
    t = inputs(B=3, P=0, L=4, S=5, device=device)
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[0] = False
    mask[2, :3] = False  # row 2, causal: the first queries see nothing (bottom-right alignment: shift 1)
    out, grads = fwd_bwd(backend, t, causal=causal, key_padding_mask=mask)
    want = oracle(t, causal=causal, key_padding_mask=mask)
    assert not torch.isnan(out).any()
    for g in grads.values():
        assert not torch.isnan(g).any()
    assert out[0].abs().max() == 0 and grads["q"][0].abs().max() == 0
    assert grads["k"][0].abs().max() == 0 and grads["v"][0].abs().max() == 0
    assert (out.double() - want).abs().max() < 1e-5
    if causal:  # row 2, queries 0 and 1 see keys <= 1 and <= 2: all padded
        assert out[2, :, :2].abs().max() == 0


@pytest.mark.parametrize("backend,device", TARGETS)
def test_zero_keys_at_all_gives_zeros(backend, device):
    """P = 0 and S = 0: every row is empty, outputs and gradients are zeros (no NaN, no fault)."""
    t = inputs(P=0, S=0, L=3, device=device)
    out, grads = fwd_bwd(backend, t, causal=False)
    assert out.shape == (2, 2, 3, 16) and out.abs().max() == 0
    assert grads["q"].abs().max() == 0


@pytest.mark.parametrize("backend,device", TARGETS)
def test_no_sequence_keys_attend_to_the_prefix(backend, device):
    """S = 0 (prefix only), P > 0."""
    t = inputs(S=0, L=3, P=4, device=device)
    out, _ = fwd_bwd(backend, t, causal=True)
    assert (out.double() - oracle(t, causal=True)).abs().max() < 1e-5


# ---- NaN / inf propagate as in PyTorch ----------------------------------------------------------------------


def _nan_cases():
    cases = []
    for where in ("q", "k", "v", "prefix_k", "prefix_v"):
        for value in ("nan", "inf"):
            cases.append((where, value))
    return cases


@pytest.mark.parametrize("where,value", _nan_cases(), ids=[f"{w}-{v}" for w, v in _nan_cases()])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_nan_and_inf_propagate_like_pytorch(backend, device, where, value):
    """A NaN/inf input never crashes and gives NaN exactly where PyTorch's own attention (the reference:
    matmul + masked softmax) gives NaN; finite elsewhere."""
    t = inputs(B=2, L=3, S=4, P=2, device=device)
    idx = {"q": (0, 1, 2, 3), "k": (1, 0, 1, 5), "v": (1, 0, 2, 0), "prefix_k": (0, 1, 2), "prefix_v": (0, 0, 7)}
    t[where][idx[where]] = float(value)
    out = prefix_attention(**t, causal=True, backend=backend)
    want = reference_prefix_attention(**t, causal=True)
    assert torch.equal(torch.isnan(out), torch.isnan(want)), (torch.isnan(out).sum(), torch.isnan(want).sum())
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), finite)
    if finite.any():
        assert (out[finite] - want[finite]).abs().max() < 1e-5


# ---- long sequence on the CPU op ------------------------------------------------------------------------------


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ cpu backend is not built")
def test_sixteen_thousand_keys_on_the_cpu_op():
    """S = 16k keys, causal, one head: the forward runs in seconds with no [L, P + S] matrix, and the last
    queries (the ones that see all 16k keys) match the float64 oracle."""
    S, P, D, L = 16384, 16, 64, 16384
    q = rand(1, 1, L, D, seed=1) * 0.5
    k, v = rand(1, 1, S, D, seed=2), rand(1, 1, S, D, seed=3)
    pk, pv = rand(1, P, D, seed=4), rand(1, P, D, seed=5)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, causal=True, backend="cpu")
    assert torch.isfinite(out).all()
    n = 32  # the last n queries, checked with the same bottom-right causal alignment (shift S - n)
    want = reference_prefix_attention(q[:, :, -n:].double(), k.double(), v.double(), pk.double(), pv.double(),
                                      causal=True)
    assert (out[:, :, -n:].double() - want).abs().max() < 1e-5
    first = reference_prefix_attention(q[:, :, :n].double(), k[:, :, :n].double(), v[:, :, :n].double(),
                                       pk.double(), pv.double(), causal=True)
    assert (out[:, :, :n].double() - first).abs().max() < 1e-5


# ---- batch permutation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi", [False, True], ids=["shared", "multi-prefix"])
@pytest.mark.parametrize("backend,device", TARGETS)
def test_batch_permutation(backend, device, multi):
    """Permuting the batch permutes out, dq, dk, dv bit for bit (rows are independent); the prefix gradients,
    sums over the rows, agree to rounding."""
    B = 4
    t = inputs(B=B, L=4, S=5, P=3, device=device)
    mask = torch.rand(B, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    kw = dict(causal=True, key_padding_mask=mask.to(device))
    if multi:
        t["prefix_k"] = rand(2, 1, 3, 16, seed=7, device=device)
        t["prefix_v"] = rand(2, 1, 3, 16, seed=8, device=device)
        kw["prefix_index"] = torch.tensor([0, 1, 1, 0], device=device)
    perm = torch.tensor([2, 0, 3, 1], device=device)
    out, grads = fwd_bwd(backend, t, **kw)
    pt = {n: (x[perm] if n in ("q", "k", "v") else x) for n, x in t.items()}
    pkw = dict(kw, key_padding_mask=kw["key_padding_mask"][perm])
    if multi:
        pkw["prefix_index"] = kw["prefix_index"][perm]
    leaves = {n: x.detach().clone().requires_grad_() for n, x in pt.items()}
    pout = prefix_attention(**leaves, backend=backend, **pkw)
    pout.backward(rand(*out.shape, seed=99, device=device)[perm])
    assert torch.equal(pout.detach(), out[perm])
    for n in ("q", "k", "v"):
        assert torch.equal(leaves[n].grad, grads[n][perm]), n
    for n in ("prefix_k", "prefix_v"):
        torch.testing.assert_close(leaves[n].grad, grads[n], rtol=1e-5, atol=1e-6)
