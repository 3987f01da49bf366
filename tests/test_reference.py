"""The oracle itself, checked against PyTorch's SDPA on explicitly concatenated keys."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from attention_cases import BASE, Case, make_inputs

from prefix_kernels.ops import reference_prefix_attention
from prefix_kernels.ops.masks import visible_keys


def sdpa_on_concatenated(q, k, v, prefix_k, prefix_v, causal=True, key_padding_mask=None, prefix_index=None):
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    pk = prefix_k[prefix_index] if prefix_index is not None else prefix_k.expand(B, -1, -1, -1)
    pv = prefix_v[prefix_index] if prefix_index is not None else prefix_v.expand(B, -1, -1, -1)
    P = pk.shape[2]
    keys = torch.cat([pk, k], 2).repeat_interleave(Hq // Hkv, 1)
    values = torch.cat([pv, v], 2).repeat_interleave(Hq // Hkv, 1)
    # The visibility rule spelled out key by key, independently of prefix_kernels.ops.masks.
    mask = torch.ones(B, 1, L, P + S, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(S):
                real = key_padding_mask is None or bool(key_padding_mask[b, j])
                mask[b, 0, i, P + j] = real and (not causal or j <= i + S - L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


@pytest.mark.parametrize("case", [BASE, replace(BASE, causal=False), replace(BASE, L=5, S=12, P=7),
                                  replace(BASE, padding=True, P=3), replace(BASE, B=4, T=3),
                                  replace(BASE, Hq=4, Hkv=1, L=1, S=9)], ids=Case.id)
def test_reference_equals_sdpa(case):
    data = make_inputs(case, torch.float64, "cpu")
    out = reference_prefix_attention(**data["tensors"], **data["kwargs"])
    want = sdpa_on_concatenated(**data["tensors"], **data["kwargs"])
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_causal_is_bottom_right_aligned():
    vis = visible_keys(1, 2, 5, 3, causal=True, key_padding_mask=None, device="cpu")[0, 0]
    # Every query sees the 3 prefix keys; query 0 sees sequence keys 0..3, query 1 sees 0..4.
    assert vis.tolist() == [[True] * 3 + [True] * 4 + [False], [True] * 8]


def test_reference_rows_without_keys_are_zero_without_nan():
    q = torch.randn(2, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 1, 3, 8, dtype=torch.float64), torch.randn(2, 1, 3, 8, dtype=torch.float64)
    empty = torch.zeros(1, 0, 8, dtype=torch.float64)
    mask = torch.tensor([[False, False, False], [True, True, True]])
    out = reference_prefix_attention(q, k, v, empty, empty, key_padding_mask=mask)
    out.sum().backward()
    assert out[0].abs().max() == 0 and torch.isfinite(out).all()
    assert q.grad[0].abs().max() == 0 and torch.isfinite(q.grad).all()


def test_reference_dropout_draws_the_keep_mask_of_its_seed():
    """`seed` replays `dropout_keep_mask(seed)` (what every backend drops); kept probabilities are scaled."""
    from prefix_kernels.ops.dropout import dropout_keep_mask

    case = replace(BASE, padding=True, T=2, B=3)
    data = make_inputs(case, torch.float64, "cpu")
    p, seed = 0.4, 2**33 + 5
    keep = dropout_keep_mask(case.B, case.Hq, case.L, case.P, case.S, p, seed)
    by_seed = reference_prefix_attention(**data["tensors"], **data["kwargs"], dropout_p=p, seed=seed)
    by_mask = reference_prefix_attention(**data["tensors"], **data["kwargs"], dropout_p=p, dropout_mask=keep)
    assert torch.equal(by_seed, by_mask)
    everything = reference_prefix_attention(**data["tensors"], **data["kwargs"], dropout_p=p,
                                            dropout_mask=torch.ones_like(keep))
    plain = reference_prefix_attention(**data["tensors"], **data["kwargs"])
    torch.testing.assert_close(everything, plain / (1 - p))
    assert (by_seed - everything).abs().max() > 1e-3


def test_reference_backend_dropout_is_a_bernoulli_draw_from_the_seed():
    """The reference backend drops like eager attention: one torch Bernoulli draw per probability, from a
    generator seeded by the call's seed (not the kernels' Philox stream, which costs ~100 integer ops each)."""
    case = replace(BASE, padding=True, B=3, T=2)
    data = make_inputs(case, torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    p, seed = 0.3, 2**35 + 3
    out, _ = torch.ops.prefix_kernels.reference_fwd(*t.values(), kw["key_padding_mask"], kw["prefix_index"], None,
                                                    None, kw["causal"], 0, 0.0, case.D**-0.5, p, seed, True)
    draws = torch.rand(case.B, case.Hq, case.L, case.P + case.S, generator=torch.Generator().manual_seed(seed))
    want = reference_prefix_attention(**t, **kw, dropout_p=p, dropout_mask=draws >= p)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
