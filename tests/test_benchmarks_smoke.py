"""The benchmark baselines compute the same attention as the reference (so that their timings compare like with
like), and the benchmark plumbing runs. No timing is asserted."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import baselines  # noqa: E402
import common  # noqa: E402

import prefix_kernels  # noqa: E402


def _inputs(B=2, Hq=4, Hkv=2, L=9, S=13, P=5, D=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    dims = [(B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, D), (Hkv, P, D), (Hkv, P, D)]
    return [torch.randn(*d, generator=g, dtype=dtype).requires_grad_(True) for d in dims]


@pytest.fixture
def eager_flex(monkeypatch):
    # The benchmark compiles flex_attention (~30 s on CPU); its eager form computes the same thing.
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(baselines, "_compiled_flex", lambda: flex_attention)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["sdpa-expand", "sdpa-concat", "flex"])
def test_baseline_matches_reference(name, causal, eager_flex):
    tensors = _inputs()
    expected = prefix_kernels.reference_prefix_attention(*tensors, causal=causal)
    if name == "flex":  # on CPU flex has no backward: check the LSE merge of its two forward calls
        with torch.no_grad():
            out = baselines.build(name, [t.detach() for t in tensors], causal).forward()
        torch.testing.assert_close(out, expected.detach(), rtol=1e-6, atol=1e-6)
        return
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, tensors, grad_out)
    method = baselines.build(name, tensors, causal)
    out = method.forward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out, method.leaves, grad_out)
    if name == "sdpa-concat":  # its K/V leaves hold [prefix expanded to the batch] + sequence
        P = tensors[3].shape[1]
        torch.testing.assert_close(grads[1][:, :, P:], expected_grads[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[1][:, :, :P].sum(0), expected_grads[3], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[2][:, :, :P].sum(0), expected_grads[4], rtol=1e-6, atol=1e-6)
    else:
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_decode_shape_sdpa_concat_matches_reference():
    tensors = _inputs(L=1, S=7)
    expected = prefix_kernels.reference_prefix_attention(*tensors, causal=True)
    torch.testing.assert_close(baselines.build("sdpa-concat", tensors, True).forward(), expected)


def test_measure_rows_and_csv_union(tmp_path):
    import microbench

    shape = common.Shape("tiny", 2, 4, 2, 8, 8, 4, 16, causal=True)
    skipped = []
    rows, table = microbench.measure([shape], ["float32"], ["reference"], "cpu", 1, ("fwd", "bwd", "fwd+bwd"),
                                     ("sdpa-expand", "flash-attn"), quick=True, skipped=skipped)
    assert {(r["mode"], r["backend"]) for r in rows} == {(m, b) for m in ("fwd", "bwd", "fwd+bwd")
                                                         for b in ("reference", "sdpa-expand")}
    assert all(r["speedup_vs_reference"] > 0 for r in rows) and len(table) == len(rows)
    assert any(line.startswith("flash-attn") for line in skipped)
    path = str(tmp_path / "r.csv")
    common.append_csv(path, [{"a": 1, "b": 2}])
    common.append_csv(path, [{"a": 3, "c": 4}])  # a new column: the file is rewritten with the union
    assert common.read_csv(path) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_mib_counts_the_call_not_its_setup():
    state = {}

    def setup():
        state["input"] = torch.ones(16 * 2**20)  # 64 MiB, allocated before the call

    def call():
        x = state["input"] * 2  # 64 MiB temporary, freed before the call returns
        del x

    assert 48 < common.peak_memory_mib(call, "cpu", setup=setup) < 96


def test_feature_benchmark_measures_every_variant_on_every_backend_that_has_it():
    import features

    layer = features.Layer(2, 2, 1, 24, 3, 16, causal=True)
    cases = [features.Case("tiny", layer, (features.Variant("plain"), features.Variant("window", {"window": 4}),
                                           features.Variant("padded", lengths=(5, 9)),
                                           features.Variant("packed", lengths=(5, 9), packed=True)))]
    rows, table = features.measure(cases, ["cpu", "reference"], "cpu", "float32", reps=1, modes=["fwd+bwd"])
    got = {(r["variant"], r["backend"]) for r in rows}
    assert got == {(v, b) for v in ("plain", "window", "padded", "packed") for b in ("cpu", "reference")}
    assert all(r["ms"] > 0 and r["vs_first_variant"] > 0 for r in rows) and len(table) == len(rows)
