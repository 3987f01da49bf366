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
from attention_cases import BASE, Case, assert_matches_reference

from prefix_kernels.ops import available_backends

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
else:
    SHIPPED = []


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
    for kernel, buckets in configs.TILE_CONFIGS.items():
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
        shipped = {t for tiles in configs.TILE_CONFIGS[kernel].values() for t in tiles}
        assert offered == shipped, kernel


def test_interpreter_and_pytest_pin_one_config():
    """Tests never spend their time tuning: one config per kernel and head dim."""
    assert configs.pinned()
    for kernel in AUTOTUNED:
        for d_pad in (16, 64, 128, 256):
            assert len(configs.configs_for(kernel, d_pad)) == 1


# ---- the atomic prefix reduction (deterministic=False) ------------------------------------------------------


def test_atomic_prefix_reduction_matches_reference():
    """deterministic=False adds the prefix gradients with fp32 atomics: not bitwise repeatable, but as
    accurate as the default."""
    assert_matches_reference(replace(BASE, B=3, T=2, L=9, S=11), torch.float32, DEVICE, "triton",
                             deterministic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_prefix_reduction_on_many_blocks(deterministic):
    """A batch large enough for every prefix split of the reduction (MAX_PREFIX_SPLITS), both modes."""
    case = replace(BASE, B=16, L=300, S=300, P=64, D=128, Hq=8, Hkv=2)
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", deterministic=deterministic)
