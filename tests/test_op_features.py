"""The op's optional features (docs/op.md): sliding windows, soft-capping, sinks and packed sequences.

Every backend that implements a feature (`Backend.implements`) is held to the float64 oracle, forward and all
gradients (the sinks' included), on a sweep of windows inside and beyond the sequence, decode and L != S,
caps that bend the scores, sinks with rows that see no key, and packed batches that mix lengths and prefixes.
The oracle itself is checked against independent formulations: transformers' eager attention for softcap and
sinks over a concatenated prefix, each packed sequence run alone, and a window that hides nothing.
A backend without a feature is passed over by `backend=None` and refused by name.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import (
    BASE,
    Case,
    assert_matches_reference,
    in_interpreter,
    make_inputs,
    op_call,
    packed_case,
    run_with_grads,
    target_dtypes,
    targets,
)

from prefix_kernels.ops import prefix_attention, reference_prefix_attention, resolve_backend
from prefix_kernels.ops.backends import FEATURES, backend as backend_record
from prefix_kernels.ops.dropout import dropout_keep_mask
from prefix_kernels.ops.reference import reference_lse

W = replace(BASE, L=20, S=20, P=5)
FEATURE_SWEEP = [
    # windows: smaller than the sequence, of one key, as long as it (hides nothing), decode and L != S
    replace(W, window=6),
    replace(W, window=1),
    replace(W, window=20),
    replace(W, window=6, causal=False),
    replace(W, window=7, padding=True),
    replace(W, L=1, S=40, P=19, window=8),
    replace(W, L=9, S=33, window=5),
    replace(W, L=20, S=11, window=4),
    replace(W, P=0, window=3, padding=True),
    replace(W, window=5, Hq=4, Hkv=1, layout="hf"),
    # soft-capping, strong enough to bend the scores (randn inputs give scaled scores of order 1)
    replace(W, softcap=1.5),
    replace(W, softcap=0.5, causal=False, padding=True),
    replace(W, softcap=2.0, L=1, S=30),
    # sinks, with a fully padded row whose only mass is its sink
    replace(W, sinks=True),
    replace(W, sinks=True, P=0, padding=True),
    replace(W, sinks=True, causal=False, Hq=6, Hkv=2),
    # packed sequences: mixed lengths, single tokens, a prefix per sequence, bidirectional
    packed_case((5, 9, 3)),
    packed_case((1, 1, 7, 1)),
    packed_case((6, 11, 4), T=2),
    packed_case((8, 5), causal=False, Hq=4, Hkv=1),
    packed_case((7, 0, 9)),
    packed_case((9, 12), P=0),
    # everything at once (Gemma 2 / GPT-OSS layers, padding-free)
    replace(W, window=6, softcap=1.5, sinks=True),
    packed_case((10, 7, 12), window=4, softcap=2.0, sinks=True, T=2),
]


def feature_targets(case: Case) -> list:
    """(backend, device, dtype) params of the backends that implement every feature `case` uses."""
    return [p for p in target_dtypes() if backend_record(p.values[0]).missing(case.features()) is None]


def implementing(*features: str, include_reference: bool = True) -> list:
    """(backend, device) params of the backends that implement `features`."""
    return [p for p in targets(include_reference=include_reference)
            if backend_record(p.values[0]).missing(features) is None]


def _params():
    out = []
    for case in FEATURE_SWEEP:
        for p in feature_targets(case):
            out.append(pytest.param(*p.values, case, id=f"{p.id}-{case.id()}", marks=p.marks))
    return out


def _small(backend: str, device: str, case: Case) -> Case:
    if in_interpreter(backend, device) and not case.packed:
        return replace(case, B=min(case.B, 2), D=16)
    return replace(case, D=16) if in_interpreter(backend, device) else case


@pytest.mark.parametrize("backend,device,dtype,case", _params())
def test_features_match_reference(backend, device, dtype, case):
    assert_matches_reference(_small(backend, device, case), dtype, device, backend)


@pytest.mark.parametrize("case", [replace(W, window=6, softcap=1.5, sinks=True, D=16),
                                  packed_case((6, 9), window=5, D=16)], ids=Case.id)
# The reference backend draws torch's Bernoulli, not the kernels' Philox stream (test_reference.py).
@pytest.mark.parametrize("backend,device", implementing("window", "softcap", "sinks", include_reference=False))
def test_features_with_dropout_replay_the_reference(backend, device, case):
    """Dropout keeps what the oracle keeps for the seed, with a window and packed (the counters of a packed row
    are those of its one row)."""
    if backend_record(backend).missing(case.features()) is None:
        assert_matches_reference(case, torch.float32, device, backend, dropout_p=0.3, seed=1234)


@pytest.mark.parametrize("backend,device", implementing("window", "sinks"))
def test_lse_includes_the_sink(backend, device):
    case = replace(W, sinks=True, window=5, P=0, padding=True, D=16)
    data = make_inputs(case, torch.float32, device)
    t, kw = data["tensors"], data["kwargs"]
    fwd = getattr(torch.ops.prefix_kernels, f"{backend}_fwd").default
    _, lse = fwd(*(t[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")), kw.get("key_padding_mask"), None, None,
                 t["sinks"], True, 5, 0.0, 16**-0.5, 0.0, 0, True)
    want = reference_lse(*(t[n].double() for n in ("q", "k", "v", "prefix_k", "prefix_v")), causal=True,
                         key_padding_mask=kw.get("key_padding_mask"), scale=16**-0.5, prefix_index=None, window=5,
                         sinks=t["sinks"].double())
    assert torch.isfinite(want).all()  # a row with no visible key still has its sink
    torch.testing.assert_close(lse.double(), want.double(), rtol=1e-4, atol=1e-4)


# ---- the oracle against independent formulations -----------------------------------------------------------


def _concatenated(t, kw):
    """PEFT's way: the prefix expanded and concatenated in front of the keys, GQA repeated, with the key
    positions and a padding mask [B, P + S] that never masks the prefix."""
    q, k, v, pk, pv = (t[n] for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(group, 1)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(group, 1)
    return keys, values


def _eager_mask(case, kw):
    """Additive float mask [B, 1, L, P + S], built here by loops over (i, j) from the rule in docs/op.md."""
    P, S, L = case.P, case.S, case.L
    mask = torch.zeros(case.B, 1, L, P + S, dtype=torch.float64)
    kpm = kw.get("key_padding_mask")
    for b in range(case.B):
        for i in range(L):
            pos = i + S - L
            for j in range(S):
                hidden = (case.causal and j > pos) or (case.window and pos - j >= case.window)
                if kpm is not None and not bool(kpm[b, j]):
                    hidden = True
                if hidden:
                    mask[b, 0, i, P + j] = float("-inf")
    return mask


@pytest.mark.parametrize("case", [replace(W, softcap=1.5, window=6, padding=True, D=16),
                                  replace(W, softcap=0.5, causal=False, D=16),
                                  replace(W, sinks=True, window=5, D=16, Hq=4, Hkv=2),
                                  replace(W, sinks=True, causal=False, padding=True, D=16)], ids=Case.id)
def test_reference_equals_transformers_eager_attention(case):
    """Gemma 2's soft-capping and GPT-OSS's sinks as transformers' own eager attention computes them, over the
    concatenated prefix with a mask written out key by key."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    data = make_inputs(case, torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    keys, values = _concatenated(t, kw)
    mask = _eager_mask(case, kw)
    module = torch.nn.Module()
    module.training, module.num_key_value_groups = False, 1
    scale = case.D**-0.5
    if case.sinks:
        module.sinks = t["sinks"]
        want, _ = gpt_oss_eager(module, t["q"], keys, values, mask, scaling=scale)
    else:
        want, _ = gemma2_eager(module, t["q"], keys, values, mask, scaling=scale, softcap=case.softcap)
    got = reference_prefix_attention(**t, **kw)
    # Gemma 2's eager softmax runs in fp32 even for float64 inputs.
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_gpt_oss_sinks_with_softcap_follow_the_op_order():
    """Where no family combines them, the op still defines the order: cap the scores, then add the sink."""
    case = replace(W, sinks=True, softcap=0.7, D=16)
    data = make_inputs(case, torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    keys, values = _concatenated(t, kw)
    scores = torch.matmul(t["q"], keys.transpose(-1, -2)) * case.D**-0.5
    scores = 0.7 * torch.tanh(scores / 0.7) + _eager_mask(case, kw)
    scores = torch.cat([scores, t["sinks"].view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], -1)
    want = torch.matmul(torch.softmax(scores, -1)[..., :-1], values)
    torch.testing.assert_close(reference_prefix_attention(**t, **kw), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,device", implementing("packed", "window", "sinks"))
def test_packed_equals_each_sequence_alone(backend, device):
    """A packed row is its sequences run one by one (each with its own prefix): outputs and prefix gradients."""
    case = _small(backend, device, packed_case((6, 11, 4), T=2, window=5, sinks=True))
    data = make_inputs(case, torch.float32, device)
    t, kw = data["tensors"], data["kwargs"]
    out, grads = run_with_grads(lambda **a: prefix_attention(**a, backend=backend), t, kw, data["grad_out"])
    bounds = kw["cu_seqlens"].tolist()
    alone_pk = torch.zeros_like(t["prefix_k"])
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = {name: x[:, :, a:b] if name in ("q", "k", "v") else x for name, x in t.items()}
        part_kw = dict(causal=case.causal, window=5, prefix_index=kw["prefix_index"][n:n + 1])
        o, g = run_with_grads(lambda **a: prefix_attention(**a, backend=backend), part, part_kw,
                              data["grad_out"][:, :, a:b])
        torch.testing.assert_close(out[:, :, a:b], o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads["q"][:, :, a:b], g["q"], rtol=1e-5, atol=1e-5)
        alone_pk += g["prefix_k"]
    torch.testing.assert_close(grads["prefix_k"], alone_pk, rtol=1e-4, atol=1e-4)


def test_a_window_that_hides_nothing_changes_nothing():
    """P + S <= window: the op equals attention without a window, and so equals PEFT's windowed cache (whose
    window counts the prefix too)."""
    data = make_inputs(replace(W, padding=True), torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    plain = reference_prefix_attention(**t, **kw)
    for window in (W.S, W.P + W.S, 4096):
        torch.testing.assert_close(reference_prefix_attention(**t, **kw, window=window), plain, rtol=0, atol=0)
    assert not torch.allclose(reference_prefix_attention(**t, **kw, window=W.S - 1), plain)


def test_the_prefix_never_slides_out_of_view():
    """With window 1 a causal query sees its own key and the whole prefix, however far from it."""
    case = replace(W, window=1, D=16)
    data = make_inputs(case, torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    keys, values = _concatenated(t, kw)
    scores = torch.matmul(t["q"], keys.transpose(-1, -2)) * 16**-0.5
    seen = torch.zeros(case.L, case.P + case.S, dtype=torch.bool)
    seen[:, :case.P] = True
    seen[torch.arange(case.L), case.P + torch.arange(case.L)] = True
    want = torch.matmul(torch.softmax(scores.masked_fill(~seen, float("-inf")), -1), values)
    torch.testing.assert_close(reference_prefix_attention(**t, **kw), want, rtol=1e-10, atol=1e-10)


# ---- which backend runs a call -----------------------------------------------------------------------------


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("backend,device", targets())
def test_a_backend_without_a_feature_is_passed_over_or_refused_by_name(backend, device, feature):
    case = {"window": replace(W, window=4), "softcap": replace(W, softcap=2.0), "sinks": replace(W, sinks=True),
            "packed": packed_case((4, 5))}[feature]
    case = replace(case, D=16)
    data = make_inputs(case, torch.float32, device)
    t, kw = data["tensors"], data["kwargs"]
    record = backend_record(backend)
    if feature in record.implements:
        out = prefix_attention(**t, **kw, backend=backend)
        assert out.shape == t["q"].shape
        return
    with pytest.raises(RuntimeError, match=rf"{backend}.*does not implement {FEATURES[feature].split(' (')[0]}"):
        prefix_attention(**t, **kw, backend=backend)
    chosen = resolve_backend(None, device, case.features())
    assert feature in chosen.implements and chosen.name != backend
    torch.testing.assert_close(prefix_attention(**t, **kw), reference_prefix_attention(**t, **kw),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", implementing("sinks"))
def test_frozen_sinks_get_no_gradient_and_trainable_ones_do(backend, device):
    data = make_inputs(replace(W, sinks=True, D=16), torch.float32, device)
    t, kw = data["tensors"], data["kwargs"]
    q = t["q"].clone().requires_grad_()
    out = prefix_attention(q, t["k"], t["v"], t["prefix_k"], t["prefix_v"], sinks=t["sinks"], backend=backend, **kw)
    out.backward(data["grad_out"])
    assert q.grad is not None and t["sinks"].grad is None
    sinks = t["sinks"].clone().requires_grad_()
    out = prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], sinks=sinks, backend=backend, **kw)
    out.backward(data["grad_out"])
    oracle = t["sinks"].double().requires_grad_()
    reference_prefix_attention(*(t[n].double() for n in ("q", "k", "v", "prefix_k", "prefix_v")), sinks=oracle,
                               **kw).backward(data["grad_out"].double())
    assert oracle.grad.abs().max() > 1e-3
    torch.testing.assert_close(sinks.grad.double(), oracle.grad, rtol=1e-4, atol=1e-5)


def test_packed_dropout_counts_positions_along_the_one_row():
    """The keep mask of a packed row is the [1, Hq, S, P + S] mask of docs/op.md, restricted to each sequence."""
    case = packed_case((3, 4), D=16)
    keep = dropout_keep_mask(1, case.Hq, case.L, case.P, case.S, 0.5, 77, "cpu")
    data = make_inputs(case, torch.float64, "cpu")
    t, kw = data["tensors"], data["kwargs"]
    got = reference_prefix_attention(**t, **kw, dropout_p=0.5, seed=77)
    with_mask = reference_prefix_attention(**t, **kw, dropout_p=0.5, dropout_mask=keep)
    torch.testing.assert_close(got, with_mask, rtol=0, atol=0)
    fwd = op_call("reference", dropout_p=0.0)
    assert not torch.allclose(got, fwd(**t, **kw))
