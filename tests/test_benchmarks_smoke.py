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
from prefix_kernels.ops.backends import TRITON_BWD_ENV, TRITON_FWD_ENV  # noqa: E402


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
@pytest.mark.parametrize("L", [9, 1])
@pytest.mark.parametrize("name", ["sdpa-peft", "sdpa-expand", "sdpa-concat", "flex"])
def test_baseline_matches_reference(name, causal, L, eager_flex):
    if L == 1 and (name == "flex" or not causal):
        pytest.skip("decode: causal, and flex is covered at L 9")
    tensors = _inputs(L=L)
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
    method.forward().backward(grad_out)
    torch.testing.assert_close(method.grads(), expected_grads, rtol=1e-6, atol=1e-6)  # as the op's 5 inputs
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


def test_wrong_method_gets_no_time_and_valid_false(monkeypatch):
    """A method whose output (or gradient) is off is flagged WRONG with no time; right ones are valid."""
    import microbench

    def off_output(tensors, causal):  # 10% off in the forward (and so in every gradient)
        right = baselines.ours("reference", tensors, causal)
        return baselines.Method("off", right.leaves, lambda: right.forward() * 1.1)

    class TripleGrad(torch.autograd.Function):  # identity forward, 3x gradient
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 3 * g

    def off_grad(tensors, causal):  # right forward, every gradient 3x
        right = baselines.ours("reference", tensors, causal)
        return baselines.Method("off-grad", right.leaves, lambda: TripleGrad.apply(right.forward()))

    monkeypatch.setitem(baselines._BUILDERS, "off", off_output)
    monkeypatch.setitem(baselines._BUILDERS, "off-grad", off_grad)
    shape = common.Shape("tiny", 2, 4, 2, 8, 8, 4, 16, causal=True)
    rows, table = microbench.measure([shape], ["float32"], ["reference", "off", "off-grad"], "cpu", 1,
                                     ("fwd", "fwd+bwd"), ("sdpa-expand", "sdpa-concat"), quick=True)
    by = {(r["mode"], r["backend"]): r for r in rows}
    assert set(by) == {(m, b) for m in ("fwd", "fwd+bwd")
                       for b in ("reference", "off", "off-grad", "sdpa-expand", "sdpa-concat")}
    for mode in ("fwd", "fwd+bwd"):
        for name in ("reference", "sdpa-expand", "sdpa-concat"):
            r = by[mode, name]
            assert r["valid"] is True and r["ms"] > 0 and r["max_err"] < 1e-4, r
        assert by[mode, "off"]["valid"] is False and by[mode, "off"]["ms"] == "" and by[mode, "off"]["max_err"] > 0.01
    assert by["fwd", "off-grad"]["valid"] is True  # its forward is right
    assert by["fwd+bwd", "off-grad"]["valid"] is False and by["fwd+bwd", "off-grad"]["grad_err"] > 0.5
    assert by["fwd+bwd", "sdpa-concat"]["grad_err"] < 1e-4  # its expanded-prefix gradients are summed back
    wrong = [row for row in table if row[3] in ("off", "off-grad") and str(row[4]).startswith("WRONG (err")]
    assert len(wrong) == 3


def test_bf16_tolerance_accepts_bf16_methods_and_rejects_a_small_error():
    import microbench

    tol = microbench.tolerances("bfloat16", (4e-3, 1e-2))
    assert tol == pytest.approx((1.8e-2, 3e-2))
    assert microbench.is_valid((1e-2, 2e-2), tol) is True
    assert microbench.is_valid((3e-2, 2e-2), tol) is False
    assert microbench.is_valid((1e-2, float("nan")), tol) is False
    assert microbench.is_valid((None, None), tol) is None
    assert microbench.tolerances("float16", None) == (microbench.FIXED_TOL["float16"],) * 2


def _verdict_row(backend, mode, ms, *, B, Hq, Hkv, L, S, P, D, causal, valid=True, pct_peak="", tflops=""):
    return dict(timestamp="2026-01-01T00:00:00Z", commit="abc", machine="GPU", device="cuda", dtype="bfloat16",
                shape="x", B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, P=P, D=D, causal=causal, mode=mode, backend=backend,
                ms="" if not valid else ms, pct_peak=pct_peak, tflops=tflops, valid=valid,
                max_err=0.5 if not valid else 0.001, grad_err="")


def test_verdict_pass_fail_not_measured(tmp_path, capsys):
    import verdict

    llama = dict(B=8, Hq=32, Hkv=8, L=2048, S=2048, D=128, causal=True)
    nlu = dict(B=32, Hq=12, Hkv=12, L=128, S=128, P=128, D=64, causal=False)
    rows = [
        _verdict_row("triton", "fwd+bwd", 10.0, P=64, **llama),  # (a) 14 / 10 = 1.4x: PASS
        _verdict_row("sdpa-peft", "fwd+bwd", 14.0, P=64, **llama),
        _verdict_row("triton", "fwd+bwd", 1.0, **nlu),  # (b) 1.5x: FAIL
        _verdict_row("sdpa-peft", "fwd+bwd", 1.5, **nlu),
        # (c): no L >= 4096 row: NOT MEASURED
        _verdict_row("triton", "fwd", 1.0, P=0, valid=False, **llama),  # (d) fwd: WRONG -> FAIL
        _verdict_row("sdpa-concat:flash", "fwd", 1.0, P=0, **llama),
        _verdict_row("triton", "fwd+bwd", 3.2, P=0, **llama),  # (d) fwd+bwd: fastest SDPA 3.0 -> 0.94x PASS
        _verdict_row("sdpa-concat", "fwd+bwd", 3.5, P=0, **llama),
        _verdict_row("sdpa-concat:cudnn", "fwd+bwd", 3.0, P=0, **llama),
        _verdict_row("sdpa-concat:efficient", "fwd+bwd", 2.0, P=0, valid=False, **llama),  # wrong: not counted
    ]
    path = str(tmp_path / "microbench.csv")
    common.append_csv(path, [dict(r, timestamp="2025-01-01T00:00:00Z", ms=0.001) for r in rows[:2]])  # older run
    common.append_csv(path, rows)
    out = str(tmp_path / "verdict.txt")
    assert verdict.main([path, "--out", out]) == 0
    lines = open(out).read().splitlines()
    assert lines[0].startswith(f"verdict of {path}: {len(rows)} rows")
    a, b, c, d_fwd, d_both, e, f, g, h, i = lines[1:]
    assert a.startswith("PASS (a)") and "1.40x" in a
    assert b.startswith("FAIL (b)") and "1.50x" in b
    assert c.startswith("NOT MEASURED (c)")
    assert d_fwd.startswith("FAIL (d)") and "WRONG" in d_fwd
    assert d_both.startswith("PASS (d)") and "0.94x" in d_both and "sdpa-concat:cudnn" in d_both
    assert e.startswith("NOT MEASURED (e)")
    assert f.startswith("INFO (f)") and "no timed triton:fused-bwd row" in f
    assert g.startswith("INFO (g)") and "no timed triton:atomic-bwd row" in g
    assert h.startswith("INFO (h)") and i.startswith("INFO (i)") and "no timed triton:tma-fwd row" in h + i
    assert capsys.readouterr().out.splitlines()[1:] == lines[1:]

    peak = [_verdict_row("triton", "fwd", 5.0, P=64, pct_peak=p, tflops=400, **dict(llama, L=L, S=L, B=B))
            for L, B, p in ((4096, 4, 61.0), (8192, 2, 48.5))]
    (c,) = [line for line in verdict.verdicts(peak) if "(c)" in line]
    assert c.startswith("FAIL (c)") and "0.48 of peak" in c and "L=4096: 61.0%" in c
    (c,) = [line for line in verdict.verdicts(peak[:1]) if "(c)" in line]
    assert c.startswith("PASS (c)")
    decode = dict(B=64, Hq=32, Hkv=8, L=1, S=8192, P=64, D=128, causal=True)
    (e,) = [line for line in verdict.verdicts([_verdict_row("triton", "fwd", 0.2, **decode),
                                               _verdict_row("sdpa-peft", "fwd", 0.3, **decode)]) if "(e)" in line]
    assert e.startswith("PASS (e)") and "1.50x" in e
    fused = _verdict_row("triton:fused-bwd", "fwd+bwd", 8.0, P=64, **llama)
    (f,) = [line for line in verdict.verdicts(rows + [fused]) if "(f)" in line]  # 10 / 8
    assert f.startswith("INFO (f)") and "1.25x" in f and "triton:fused-bwd 8.000 ms" in f
    (f,) = [line for line in verdict.verdicts(rows + [dict(fused, valid=False, ms="")]) if "(f)" in line]
    assert f.startswith("INFO (f)") and "WRONG" in f
    atomic = _verdict_row("triton:atomic-bwd", "fwd+bwd", 12.5, P=64, **llama)
    (g,) = [line for line in verdict.verdicts(rows + [atomic]) if "(g)" in line]  # 10 / 12.5
    assert g.startswith("INFO (g)") and "0.80x" in g and "triton:atomic-bwd 12.500 ms" in g
    long = dict(llama, B=2, L=8192, S=8192)
    tma = [_verdict_row("triton", "fwd", 4.0, P=64, **llama), _verdict_row("triton:tma-fwd", "fwd", 3.2, P=64, **llama),
           _verdict_row("triton", "fwd", 9.0, P=64, **long), _verdict_row("triton:tma-fwd", "fwd", 10.0, P=64, **long)]
    h, i = [line for line in verdict.verdicts(tma) if line.startswith(("INFO (h)", "INFO (i)"))]
    assert "1.25x" in h and "triton:tma-fwd 3.200 ms" in h and "0.90x" in i and "triton:tma-fwd 10.000 ms" in i
    (a,) = [line for line in verdict.verdicts(rows[:1]) if "(a)" in line]  # no PEFT row
    assert a.startswith("NOT MEASURED (a)")


def test_verdict_reads_measure_rows_at_p0(tmp_path):
    """P = 0 runs through every CPU method, and verdict.py reads the rows microbench writes."""
    import microbench
    import verdict

    shape = common.Shape("tiny P=0", 2, 4, 2, 8, 8, 0, 16, causal=True)
    rows, _ = microbench.measure([shape], ["float32"], ["reference"], "cpu", 1, ("fwd", "fwd+bwd"),
                                 ("sdpa-peft", "sdpa-concat", "sdpa-concat:flash"), quick=True)
    assert {r["backend"] for r in rows} == {"reference", "sdpa-peft", "sdpa-concat"}  # forced kernels: CUDA only
    assert all(r["valid"] is True for r in rows)
    path = str(tmp_path / "m.csv")
    common.append_csv(path, rows)
    got = verdict.verdicts(common.read_csv(path), ours="sdpa-peft", dtype="float32")
    targets = [line for line in got if not line.startswith("INFO")]
    assert targets and all(line.startswith("NOT MEASURED") for line in targets)  # not the verdict shapes
    assert all("no timed" in line for line in got if line.startswith("INFO"))


@pytest.mark.parametrize("name,kernel,absent", [("triton:fused-bwd", "prefix_attention_bwd_fused", "bwd_dq"),
                                                ("triton:atomic-bwd", "prefix_attention_bwd_dkdv", "bwd_dq"),
                                                ("triton:tma-fwd", "prefix_attention_fwd TMA", "fwd pointers")])
def test_triton_variant_methods_run_their_kernels(monkeypatch, name, kernel, absent):
    """`triton:fused-bwd` / `triton:atomic-bwd` / `triton:tma-fwd` time the triton op with
    PREFIX_KERNELS_TRITON_BWD=fused / atomic (atomic: deterministic=False) / PREFIX_KERNELS_TRITON_FWD=tma around its
    forward and its backward (which reads the variable when it runs), restore the environment after, and are
    skipped off CUDA."""
    import microbench

    if "triton" not in prefix_kernels.available_backends("cpu"):
        pytest.skip("the triton backend (its interpreter) is unavailable")
    from prefix_kernels.ops.triton import configs, launch

    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)  # these few rows would take the decode kernel
    monkeypatch.delenv(TRITON_BWD_ENV, raising=False)
    monkeypatch.delenv(TRITON_FWD_ENV, raising=False)
    names = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "")
        if name == "prefix_attention_fwd":
            names.append(f"{name} {'TMA' if kwargs['TMA'] else 'pointers'}")
        names.append(name)
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    tensors = _inputs(dtype=torch.float32)
    method = baselines.build(name, tensors, True)
    _, call = microbench._calls(method, torch.randn(2, 4, 9, 16), "fwd+bwd")
    call()
    assert kernel in names and f"prefix_attention_{absent}" not in names, names
    assert TRITON_BWD_ENV not in os.environ and TRITON_FWD_ENV not in os.environ
    assert all(t.grad is not None for t in tensors)
    assert baselines.unavailable_reason(name, "cpu", torch.bfloat16) is not None
    assert name in microbench.VERDICT_BASELINES
