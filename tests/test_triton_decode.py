"""The triton forward's decode path (kernels_decode.py, docs/kernels.md "Decode"): GQA heads stacked on the rows
of one program, the keys split over programs and the splits merged by their LSE.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, conftest.py); PREFIX_KERNELS_DECODE_SPLITS
forces the split count, so that 1, 2, 3 and more splits than key blocks (splits that see no key) all run. The
forward is judged as the other triton tests judge it: its error against the float64 reference is at most twice
that of the reference computed in the same dtype, plus a small floor (attention_cases.assert_matches_reference).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import product

import pytest
import torch
from attention_cases import ABS_FLOOR, Case, assert_matches_reference, make_inputs, op_call, packed_case

from prefix_kernels.ops import available_backends
from prefix_kernels.ops.reference import reference_lse, reference_prefix_attention
from prefix_kernels.ops.triton import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

if "triton" in available_backends(DEVICE):
    from prefix_kernels.ops.triton import configs, launch

DECODE, MERGE, REGULAR = "prefix_attention_fwd_decode", "prefix_attention_fwd_decode_merge", "prefix_attention_fwd"
MANY = 12  # more splits than most of these shapes have key blocks (16 keys a block in the interpreter)


@pytest.fixture
def launched(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """(kernel name, grid, meta-parameters) of every launch of the triton backend, recorded on the way through
    `launch._launch` (the kernels still run)."""
    calls = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        calls.append((name, grid, kwargs))
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    return calls


def names(calls) -> list[str]:
    return [name for name, _, _ in calls]


def forward(case: Case, dtype: torch.dtype, dropout_p: float = 0.0):
    """(out, lse, inputs) of the triton forward op on the case's inputs."""
    data = make_inputs(case, dtype, DEVICE)
    t, kw = data["tensors"], data["kwargs"]
    out, lse = torch.ops.prefix_kernels.triton_fwd.default(
        t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], kw.get("key_padding_mask"), kw.get("prefix_index"),
        kw.get("cu_seqlens"), t.get("sinks"), case.causal, case.window, case.softcap, case.D ** -0.5, dropout_p, 7,
        True)
    return out, lse, data


def reference(case: Case, data: dict, dtype: torch.dtype):
    """(out, lse) of the reference on the inputs cast to `dtype`."""
    t, kw = ({n: x.to(dtype) for n, x in data["tensors"].items()}, data["kwargs"])
    sinks = t.pop("sinks", None)
    features = dict(causal=case.causal, key_padding_mask=kw.get("key_padding_mask"),
                    prefix_index=kw.get("prefix_index"), window=case.window or None, softcap=case.softcap or None,
                    sinks=sinks, scale=case.D ** -0.5)
    out = reference_prefix_attention(**t, **features, cu_seqlens=kw.get("cu_seqlens"))
    lse = reference_lse(*t.values(), **features, cu_seqlens=kw.get("cu_seqlens"))
    return out, lse


def assert_forward_matches(case: Case, dtype: torch.dtype, out, lse, data) -> None:
    """out and lse within twice the error of the reference in `dtype` (plus a floor) of the float64 oracle; lse
    +inf exactly where a row sees no key and no sink, with zeros out there."""
    want_out, want_lse = reference(case, data, torch.float64)
    same_out, same_lse = reference(case, data, dtype)
    assert out.dtype == dtype and out.shape == want_out.shape and lse.shape == want_lse.shape
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("inf")).all()
    assert (out[~finite] == 0).all()
    for name, got, same, want in (("out", out, same_out, want_out), ("lse", lse[finite], same_lse[finite],
                                                                     want_lse[finite])):
        if want.numel() == 0:
            continue
        err = (got.double() - want).abs().max().item()
        ref_err = (same.double() - want).abs().max().item()
        assert err <= 2 * ref_err + ABS_FLOOR[dtype], (
            f"{name}: error {err:.3e} > 2 x reference {dtype} error {ref_err:.3e} + {ABS_FLOOR[dtype]:.0e}")


def run_decode(case: Case, dtype: torch.dtype, splits: int, monkeypatch, launched) -> None:
    monkeypatch.setenv(launch.DECODE_SPLITS_ENV, str(splits))
    out, lse, data = forward(case, dtype)
    assert_forward_matches(case, dtype, out, lse, data)
    assert names(launched) == [DECODE] + ([MERGE] if splits > 1 else []), names(launched)
    assert launched[0][1] == (case.B * case.Hkv, launched[0][1][1], splits)


# ---- the forward against the oracle --------------------------------------------------------------------------

SPLITS = (1, 2, 3, MANY)
# Every (L, S) with GQA group 4 and an odd head dim (D_PAD 32), causal (the op's bottom-right rule: with S < L
# the first queries see only the prefix) and bidirectional, the split count going round 1, 2, 3, many.
GRID = [(Case(B=2, Hq=8, Hkv=2, L=L, S=S, P=5, D=24, causal=causal), SPLITS[i % 4], torch.float32)
        for i, ((L, S), causal) in enumerate(product(product((1, 2, 3, 5), (0, 1, 7, 33, 130)), (True, False)))]
GRID += [(replace(case, causal=causal), SPLITS[i % 4], torch.float16)
         for i, ((L, S), causal) in enumerate(product(product((1, 5), (7, 130)), (True, False)))
         for case in [Case(B=2, Hq=8, Hkv=2, L=L, S=S, P=5, D=24)]]
# One knob at a time, each with 1, 3 and many splits: GQA group 1 and 8, P 0 (a fully padded row sees no key)
# and 16 (whole blocks), no key at all, windows, softcap, sinks (a row with only its sink), padding, several
# prefixes, head dims, layouts, everything at once, fp16.
FEATURES = [
    Case(B=2, Hq=3, Hkv=3, L=5, S=33, P=16, D=24),
    Case(B=2, Hq=8, Hkv=1, L=5, S=33, P=16, D=24),
    Case(B=2, Hq=8, Hkv=1, L=1, S=130, P=16, D=24, causal=False),
    Case(B=3, Hq=4, Hkv=2, L=3, S=7, P=0, D=16, padding=True),
    Case(B=3, Hq=4, Hkv=2, L=1, S=33, P=0, D=16, padding=True, causal=False),
    Case(B=2, Hq=4, Hkv=2, L=2, S=0, P=0, D=16, causal=False),
    Case(B=2, Hq=4, Hkv=1, L=1, S=130, P=5, D=16, window=16),
    Case(B=2, Hq=4, Hkv=1, L=3, S=33, P=5, D=16, window=4, causal=False),
    Case(B=2, Hq=8, Hkv=2, L=5, S=130, P=16, D=16, window=1),
    Case(B=2, Hq=8, Hkv=2, L=5, S=7, P=5, D=16, window=3),
    Case(B=2, Hq=4, Hkv=2, L=2, S=33, P=5, D=16, softcap=2.0),
    Case(B=2, Hq=4, Hkv=2, L=3, S=33, P=5, D=16, sinks=True),
    Case(B=2, Hq=4, Hkv=2, L=1, S=0, P=0, D=16, sinks=True),
    Case(B=3, Hq=8, Hkv=2, L=5, S=7, P=0, D=16, sinks=True, padding=True),
    Case(B=2, Hq=4, Hkv=2, L=1, S=130, P=5, D=16, padding=True),
    Case(B=2, Hq=4, Hkv=2, L=3, S=33, P=5, D=16, left_pad=20),
    Case(B=4, Hq=4, Hkv=2, L=1, S=33, P=16, D=16, T=3),
    Case(B=3, Hq=4, Hkv=1, L=5, S=7, P=5, D=16, T=2, padding=True, causal=False),
    Case(B=2, Hq=4, Hkv=2, L=3, S=33, P=5, D=40),
    Case(B=2, Hq=4, Hkv=2, L=3, S=33, P=5, D=64, layout="hf"),
    Case(B=2, Hq=4, Hkv=2, L=2, S=33, P=5, D=16, layout="strided", causal=False),
    Case(B=3, Hq=8, Hkv=1, L=5, S=130, P=21, D=24, T=2, padding=True, window=40, softcap=5.0, sinks=True),
]
HALF = [FEATURES[10], FEATURES[-1]]  # softcap; everything at once
CASES = GRID + [(case, splits, torch.float32) for case, splits in product(FEATURES, (1, 3, MANY))] + [
    (case, splits, torch.float16) for case, splits in product(HALF, (1, 3))]


@pytest.mark.parametrize("case,splits,dtype", CASES,
                         ids=[f"{c.id()}-splits{s}-{str(d)[6:]}" for c, s, d in CASES])
def test_decode_forward_matches_reference(monkeypatch, launched, case, splits, dtype):
    """out and lse of the decode kernels (and only those: no prefix_attention_fwd) against the float64 oracle."""
    run_decode(case, dtype, splits, monkeypatch, launched)


def test_sweep_covers_what_it_says():
    cases = [c for c, _, _ in CASES]
    assert {c.Hq // c.Hkv for c in cases} >= {1, 4, 8}
    assert {c.L for c in cases} == {1, 2, 3, 5}
    assert {c.S for c in cases} >= {0, 1, 7, 33, 130} and {c.P for c in cases} >= {0, 5, 16}
    assert {s for _, s, _ in CASES} == set(SPLITS) and {d for _, _, d in CASES} == {torch.float32, torch.float16}
    for knob in ("window", "softcap", "sinks", "padding", "T", "left_pad"):
        assert any(getattr(c, knob) for c in cases), knob
    assert all(c.Hq // c.Hkv * c.L <= configs.DECODE_MAX_ROWS for c in cases)


# ---- through autograd: the backward reads the decode path's lse ---------------------------------------------

BACKWARD = [
    (Case(B=2, Hq=8, Hkv=2, L=3, S=33, P=5, D=24), 3, torch.float32),
    (Case(B=3, Hq=8, Hkv=1, L=1, S=40, P=16, D=16, padding=True, T=2), MANY, torch.float32),
    (Case(B=3, Hq=4, Hkv=2, L=5, S=7, P=0, D=16, padding=True, causal=False), 2, torch.float32),
    (Case(B=2, Hq=4, Hkv=2, L=5, S=33, P=3, D=16, window=8, softcap=3.0, sinks=True), 2, torch.float32),
    (Case(B=2, Hq=4, Hkv=1, L=2, S=33, P=5, D=16, sinks=True), 1, torch.float16),
]


@pytest.mark.parametrize("case,splits,dtype", BACKWARD,
                         ids=[f"{c.id()}-splits{s}-{str(d)[6:]}" for c, s, d in BACKWARD])
def test_backward_after_a_decode_forward(monkeypatch, launched, case, splits, dtype):
    """prefix_attention with autograd: the output and all gradients (the sinks' included, which come from lse
    alone) match the oracle, so the lse the decode path saves is the one the backward expects."""
    monkeypatch.setenv(launch.DECODE_SPLITS_ENV, str(splits))
    assert_matches_reference(case, dtype, DEVICE, "triton")
    assert names(launched)[:2] == [DECODE] + ([MERGE] if splits > 1 else ["prefix_attention_bwd_preprocess"])
    assert REGULAR not in names(launched)


# ---- when the decode path is taken --------------------------------------------------------------------------


def test_takes_decode_path():
    rows = configs.DECODE_MAX_ROWS
    assert launch.takes_decode_path(1, 8, 0.0, None) and launch.takes_decode_path(rows // 4, 4, 0.0, None)
    assert not launch.takes_decode_path(rows // 4 + 1, 4, 0.0, None)
    assert not launch.takes_decode_path(1, 8, 0.1, None)
    assert not launch.takes_decode_path(1, 1, 0.0, torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("L,path", [(16, DECODE), (17, REGULAR)])
def test_the_row_budget_decides(launched, L, path):
    """GROUP * L = 64 stacks (the budget), 68 takes the regular forward; both match the oracle."""
    case = Case(B=1, Hq=4, Hkv=1, L=L, S=20, P=5, D=16)
    out, lse, data = forward(case, torch.float32)
    assert_forward_matches(case, torch.float32, out, lse, data)
    assert names(launched)[0] == path and (DECODE in names(launched)) == (path == DECODE)


@pytest.mark.parametrize("how", ["dropout", "packed"])
def test_dropout_and_packed_take_the_regular_forward(launched, how):
    if how == "dropout":
        case = Case(B=2, Hq=4, Hkv=2, L=1, S=20, P=5, D=16)
        data = make_inputs(case, torch.float32, DEVICE)
        out = op_call("triton", dropout_p=0.3, seed=99)(**data["tensors"], **data["kwargs"])
        want = reference_prefix_attention(**{n: x.double() for n, x in data["tensors"].items()},
                                          **data["kwargs"], dropout_p=0.3, seed=99)
        assert (out.double() - want).abs().max() < 1e-5
    else:
        case = packed_case((3, 4), Hq=2, Hkv=1, P=5, D=16)
        out, lse, data = forward(case, torch.float32)
        assert_forward_matches(case, torch.float32, out, lse, data)
    assert names(launched) == [REGULAR]


def test_split_count(monkeypatch):
    """On CUDA: about one wave of the SMs, at least MIN_DECODE_SPLIT_BLOCKS key blocks a split, at most
    MAX_DECODE_SPLITS, none when the tile blocks fill the GPU. The variable forces any count; the interpreter
    merges up to 3 splits by default."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(launch.DECODE_SPLITS_ENV, raising=False)
    if interpreting():
        assert [launch.decode_splits(torch.device("cpu"), 4, n) for n in (0, 1, 2, 3, 40)] == [1, 1, 2, 3, 3]
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_sm_count", lambda index: 132)
    assert launch.decode_splits(cuda, 132, 10_000) == 1 and launch.decode_splits(cuda, 4096, 10_000) == 1
    assert launch.decode_splits(cuda, 8, 10_000) == 17  # 8 tile blocks x 17 splits: one wave of 132 SMs
    assert launch.decode_splits(cuda, 1, 10_000) == launch.MAX_DECODE_SPLITS
    assert launch.decode_splits(cuda, 8, 10) == 10 // launch.MIN_DECODE_SPLIT_BLOCKS
    assert launch.decode_splits(cuda, 8, 3) == 1
    monkeypatch.setenv(launch.DECODE_SPLITS_ENV, "40")
    assert launch.decode_splits(cuda, 4096, 1) == 40


# ---- the production tile sizes in the interpreter ----------------------------------------------------------

SHIPPED = [
    # 40 stacked rows (BLOCK_M 64 at the shipped tile), P and S across several 64-key blocks, padding
    (Case(B=1, Hq=8, Hkv=1, L=5, S=200, P=70, D=24, padding=True), 64),
    # 6 rows (BLOCK_M 16), a window, softcap and sinks
    (Case(B=1, Hq=4, Hkv=2, L=3, S=150, P=3, D=16, window=70, softcap=3.0, sinks=True), 16),
]


@pytest.mark.skipif(not interpreting(), reason="the GPU runs the shipped tiles anyway")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case,block_m", SHIPPED, ids=[c.id() for c, _ in SHIPPED])
def test_decode_at_shipped_tiles(monkeypatch, launched, case, block_m, splits):
    with configs.shipped_tiles():
        run_decode(case, torch.float32, splits, monkeypatch, launched)
    tiles = configs.DECODE_TILES[configs.head_dim_bucket(max(16, 1 << (case.D - 1).bit_length()))]
    meta = launched[0][2]
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) in tiles
    assert meta["BLOCK_M"] == block_m


# ---- on the GPU -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_big_decode_batch(launched):
    """B * Hq = 65536 query rows of one decode step, more than a grid's axis 1 or 2 takes: the decode grid puts
    B * Hkv on axis 0."""
    case = Case(B=2048, Hq=32, Hkv=8, L=1, S=24, P=8, D=64)
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton")
    assert launched[0][0] == DECODE and launched[0][1][0] == case.B * case.Hkv


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 128, 200])
def test_decode_splits_on_the_gpu(monkeypatch, launched, D, dtype):
    """Few tile blocks and a long cache: the SM count asks for splits, merged by their LSE, every head-dim
    bucket's tile."""
    monkeypatch.delenv(launch.DECODE_SPLITS_ENV, raising=False)
    case = Case(B=1, Hq=16, Hkv=2, L=1, S=3000, P=70, D=D, padding=True)
    assert_matches_reference(case, dtype, "cuda", "triton")
    assert names(launched)[:2] == [DECODE, MERGE] and launched[0][1][2] > 1
