"""What only the triton backend has: its tile configurations, the atomic (non-deterministic) prefix reduction.

Everything every backend shares (the sweep against the float64 oracle, dropout, determinism, compile, opcheck,
output_mask, layouts) is in test_backends.py. Without a GPU the kernels run in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set by conftest.py), so the shapes here stay tiny; the `gpu` tests run each
shipped tile configuration on the device.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import BASE, Case, assert_matches_reference, make_inputs, packed_case, run_with_grads

from prefix_kernels.ops import available_backends, prefix_attention, reference_prefix_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

if "triton" in available_backends(DEVICE):
    from prefix_kernels.ops.triton import configs, kernels, launch

    # The autotuned kernels, by their key in configs.TILE_CONFIGS.
    AUTOTUNED = {"fwd": kernels.prefix_attention_fwd, "bwd_dq": kernels.prefix_attention_bwd_dq,
                 "bwd_dkdv": kernels.prefix_attention_bwd_dkdv, "bwd_dprefix": kernels.prefix_attention_bwd_dprefix}
    SHIPPED = [(kernel, bucket, tile) for kernel, buckets in configs.TILE_CONFIGS.items()
               for bucket, tiles in buckets.items() for tile in tiles]
    SHIPPED_FEATURES = [(kernel, bucket, tile) for kernel, buckets in configs.FEATURE_TILE_CONFIGS.items()
                        for bucket, tiles in buckets.items() for tile in tiles]
else:
    SHIPPED = SHIPPED_FEATURES = []


def force_tiles(monkeypatch, tiles: dict[str, tuple[int, int, int, int]]) -> list:
    """Launch the named kernels with the given (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the
    autotuner's choice (under pytest it pins the first config of each head-dim bucket): every launch goes
    through `launch._launch`, which here calls the autotuner's underlying kernel with explicit meta-parameters
    (the grids read BLOCK_M / BLOCK_N from them). Returns the list of forced launches, (kernel, tile)."""
    launched = []
    original = launch._launch

    def forced(kernel, grid, *args, **kwargs):
        for name, autotuned in AUTOTUNED.items():
            if kernel is autotuned and name in tiles:
                block_m, block_n, warps, stages = tiles[name]
                launched.append((name, tiles[name]))
                kernel.fn[grid](*args, **kwargs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                num_stages=stages)
                return
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", forced)
    return launched


# Several blocks of the largest tiles (128 rows) with ragged edges, causal with S > L, padding, GQA.
HEAD_DIM_OF_BUCKET = {64: 64, 128: 96, 256: 200}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel,bucket,tile,deterministic",
                         [(k, b, t, d) for k, b, t in SHIPPED
                          for d in ([True, False] if k == "bwd_dprefix" else [True])],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_tile_config(monkeypatch, kernel, bucket, tile, deterministic, dtype):
    """Each entry of configs.TILE_CONFIGS, forced on its kernel, against the float64 oracle."""
    case = Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=HEAD_DIM_OF_BUCKET[bucket], padding=True)
    launched = force_tiles(monkeypatch, {kernel: tile})
    assert_matches_reference(case, dtype, "cuda", "triton", deterministic=deterministic)
    assert launched == [(kernel, tile)], launched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel,bucket,tile", SHIPPED_FEATURES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_feature_tile_config(monkeypatch, kernel, bucket, tile, dtype):
    """Each entry of configs.FEATURE_TILE_CONFIGS, forced on its kernel, with every feature on: packed
    sequences longer than the tiles (a prefix each), a window, softcap and sinks."""
    case = packed_case((150, 37, 170), Hq=4, Hkv=2, P=130, D=HEAD_DIM_OF_BUCKET[bucket], T=2, window=100,
                       softcap=5.0, sinks=True)
    launched = force_tiles(monkeypatch, {kernel: tile})
    assert_matches_reference(case, dtype, "cuda", "triton")
    assert launched == [(kernel, tile)], launched


# Tiles no pinned config uses, all four kernels at once, with several blocks per row at the interpreter's size.
SMALL_TILES = {"fwd": (16, 32, 4, 1), "bwd_dq": (32, 16, 4, 1), "bwd_dkdv": (32, 16, 4, 1),
               "bwd_dprefix": (16, 32, 4, 1)}


@pytest.mark.parametrize("deterministic", [True, False])
def test_forced_tiles_run_and_match_the_reference(monkeypatch, deterministic):
    """The forcing mechanism of the test above, on tiles other than the pinned ones (the interpreter's is
    16 x 16): every kernel really runs with the forced tile, and the result is still the oracle's."""
    case = Case(B=1, Hq=2, Hkv=1, L=20, S=37, P=33, D=16, padding=True)
    launched = force_tiles(monkeypatch, SMALL_TILES)
    assert_matches_reference(case, torch.float32, DEVICE, "triton", deterministic=deterministic)
    assert sorted(launched) == sorted(SMALL_TILES.items()), launched


def test_tile_configs_are_well_formed():
    """Every kernel has tiles for every head-dim bucket; blocks are powers of two the kernels can `tl.dot`."""
    for kernel, buckets in [*configs.TILE_CONFIGS.items(), *configs.FEATURE_TILE_CONFIGS.items()]:
        assert sorted(buckets) == [64, 128, 256], kernel
        for bucket, tiles in buckets.items():
            assert tiles and len(set(tiles)) == len(tiles), (kernel, bucket)
            for block_m, block_n, warps, stages in tiles:
                for block in (block_m, block_n):
                    assert block >= 16 and block & (block - 1) == 0, (kernel, bucket, block)
                assert warps in (1, 2, 4, 8, 16) and stages >= 1, (kernel, bucket)
    assert configs.head_dim_bucket(16) == configs.head_dim_bucket(64) == 64
    assert configs.head_dim_bucket(128) == 128 and configs.head_dim_bucket(256) == 256


@pytest.mark.gpu
def test_autotuner_offers_every_shipped_config():
    """Outside pytest the autotuner chooses among all shipped tiles of the call's head-dim bucket."""
    for kernel in AUTOTUNED:
        offered = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   for c in configs.all_configs(kernel)}
        shipped = {t for table in (configs.TILE_CONFIGS, configs.FEATURE_TILE_CONFIGS)
                   for tiles in table[kernel].values() for t in tiles}
        assert offered == shipped, kernel


def test_interpreter_and_pytest_pin_one_config():
    """Tests never spend their time tuning: one config per kernel and head dim."""
    assert configs.pinned()
    for kernel in AUTOTUNED:
        for d_pad in (16, 64, 128, 256):
            for features in (False, True):
                assert len(configs.configs_for(kernel, d_pad, features)) == 1


def test_feature_launches_choose_among_the_feature_tiles(monkeypatch):
    """Outside the interpreter and pytest, a launch that uses any optional feature is offered the feature tiles of
    its head-dim bucket (the plain ones at 255 registers spill with them), a plain launch the plain tiles."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "pinned", lambda: False)
    for kernel, autotuned in AUTOTUNED.items():
        offered = [configs._config(tile) for table in (configs.TILE_CONFIGS, configs.FEATURE_TILE_CONFIGS)
                   for tiles in table[kernel].values() for tile in tiles]
        for flag in configs.FEATURE_KEYS[kernel]:
            for d_pad, bucket in ((32, 64), (128, 128), (256, 256)):
                for features, table in ((False, configs.TILE_CONFIGS), (True, configs.FEATURE_TILE_CONFIGS)):
                    kept = autotuned.early_config_prune(offered, {}, D_PAD=d_pad, **{flag: features})
                    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
                    assert tiles == set(table[kernel][bucket]), (kernel, flag, d_pad, features)


# ---- the atomic prefix reduction (deterministic=False) ------------------------------------------------------


def test_atomic_prefix_reduction_matches_reference():
    """deterministic=False adds the prefix gradients with fp32 atomics: not bitwise repeatable, but as
    accurate as the default."""
    assert_matches_reference(replace(BASE, B=3, T=2, L=9, S=11), torch.float32, DEVICE, "triton",
                             deterministic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_atomic_prefix_reduction_matches_reference_gpu(dtype):
    """The atomic prefix reduction in half precision on the GPU (the test above runs fp32, unmarked)."""
    assert_matches_reference(replace(BASE, B=3, T=2, L=9, S=11), dtype, "cuda", "triton", deterministic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_prefix_reduction_on_many_blocks(deterministic):
    """A batch large enough for every prefix split of the reduction (MAX_PREFIX_SPLITS), both modes."""
    case = replace(BASE, B=16, L=300, S=300, P=64, D=128, Hq=8, Hkv=2)
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", deterministic=deterministic)


# ---- blocks no query sees are never read -------------------------------------------------------------------


def _poisoned_run(case: Case, poison: torch.Tensor, monkeypatch, tiles):
    """The triton op on inputs whose k/v are NaN at the sequence positions `poison` (bool [S]), and the float64
    oracle on the clean inputs: (out, grads, oracle out, oracle grads)."""
    if tiles:
        force_tiles(monkeypatch, tiles)
    data = make_inputs(case, torch.float32, DEVICE)
    tensors, kwargs = data["tensors"], data["kwargs"]
    want_out, want_grads = run_with_grads(reference_prefix_attention, tensors, kwargs, data["grad_out"],
                                          dtype=torch.float64)
    poisoned = dict(tensors)
    for name in ("k", "v"):
        poisoned[name] = tensors[name].clone()
        poisoned[name][:, :, poison.to(DEVICE)] = float("nan")
    out, grads = run_with_grads(lambda **kw: prefix_attention(**kw, backend="triton"), poisoned, kwargs,
                                data["grad_out"])
    return out, grads, want_out, want_grads


def _assert_close(got, want, name):
    assert torch.isfinite(got).all(), name
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["pinned", "small-tiles"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_keys_outside_every_window_are_never_read(monkeypatch, tiles, causal):
    """Chunked prefill (L < S) with a window: keys before S - L - window + 1 are in no query's window. Filled
    with NaN across several key blocks (and the start of a block some queries see), they change nothing: output
    and all gradients are finite and equal the oracle's on clean values (zeros for those keys)."""
    case = Case(B=1, Hq=2, Hkv=1, L=20, S=83, P=5, D=16, causal=causal, window=10, softcap=2.0, sinks=True)
    unseen = torch.arange(case.S) < case.S - case.L - case.window + 1  # 54 keys: blocks 0-2 and part of 3
    out, grads, want_out, want_grads = _poisoned_run(case, unseen, monkeypatch, tiles)
    _assert_close(out, want_out, "out")
    for name, want in want_grads.items():
        _assert_close(grads[name], want, name)
    assert grads["k"][:, :, unseen].abs().max() == 0 and grads["v"][:, :, unseen].abs().max() == 0


@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["pinned", "small-tiles"])
def test_packed_sequences_never_read_each_other(monkeypatch, tiles):
    """NaN keys and values in the middle sequence of a packed row reach no output or gradient of the others
    (whose query and key blocks share tiles with it), each with its own prefix."""
    case = packed_case((21, 30, 13), Hq=2, Hkv=1, P=5, D=16, T=2, window=12, sinks=True)
    middle = torch.zeros(case.S, dtype=torch.bool)
    middle[21:51] = True
    out, grads, want_out, want_grads = _poisoned_run(case, middle, monkeypatch, tiles)
    others = ~middle.to(DEVICE)
    _assert_close(out[:, :, others], want_out[:, :, others], "out")
    _assert_close(grads["q"][:, :, others], want_grads["q"][:, :, others], "q")
    for name in ("k", "v"):
        _assert_close(grads[name][:, :, others], want_grads[name][:, :, others], name)
