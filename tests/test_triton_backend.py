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

from prefix_kernels.ops.backends import TRITON_BWD_ENV
from prefix_kernels.ops import available_backends, prefix_attention, reference_prefix_attention
from prefix_kernels.ops.triton import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE),
                                reason=f"the triton backend is unavailable on {DEVICE}")

if "triton" in available_backends(DEVICE):
    from prefix_kernels.ops.triton import configs, kernels, kernels_bwd_fused, launch

    # The autotuned kernels, by their key in configs.TILE_CONFIGS.
    AUTOTUNED = {"fwd": kernels.prefix_attention_fwd, "bwd_dq": kernels.prefix_attention_bwd_dq,
                 "bwd_dkdv": kernels.prefix_attention_bwd_dkdv,
                 "bwd_fused": kernels_bwd_fused.prefix_attention_bwd_fused,
                 "bwd_dprefix": kernels.prefix_attention_bwd_dprefix}
    SHIPPED = [(kernel, bucket, tile) for kernel, buckets in configs.TILE_CONFIGS.items()
               for bucket, tiles in buckets.items() for tile in tiles]
    SHIPPED_FEATURES = [(kernel, bucket, tile) for kernel, buckets in configs.FEATURE_TILE_CONFIGS.items()
                        for bucket, tiles in buckets.items() for tile in tiles]
    SHIPPED_DROPOUT = [(kernel, bucket, tile) for kernel, buckets in configs.DROPOUT_TILE_CONFIGS.items()
                       for bucket, tiles in buckets.items() for tile in tiles]
    SHIPPED_ATOMIC_DQ = [(kernel, bucket, tile) for kernel, buckets in configs.ATOMIC_DQ_TILE_CONFIGS.items()
                         for bucket, tiles in buckets.items() for tile in tiles]
    ALL_TABLES = (configs.TILE_CONFIGS, configs.DROPOUT_TILE_CONFIGS, configs.FEATURE_TILE_CONFIGS,
                  configs.ATOMIC_DQ_TILE_CONFIGS)
else:
    SHIPPED = SHIPPED_FEATURES = SHIPPED_DROPOUT = SHIPPED_ATOMIC_DQ = []
    ALL_TABLES = ()


def force_tiles(monkeypatch, tiles: dict[str, tuple[int, int, int, int]]) -> list:
    """Launch the named kernels with the given (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the
    autotuner's choice (under pytest it pins the first config of each head-dim bucket): every launch goes
    through `launch._launch`, which here calls the autotuner's underlying kernel with explicit meta-parameters
    (the grids read BLOCK_M / BLOCK_N from them). Forcing the opt-in fused backward selects it. Returns the list
    of forced launches, (kernel, tile)."""
    launched = []
    if "bwd_fused" in tiles:
        monkeypatch.setenv(TRITON_BWD_ENV, "fused")
    original = launch._launch

    def forced(kernel, grid, *args, **kwargs):
        for name, autotuned in AUTOTUNED.items():
            if kernel is autotuned and name in tiles:
                launched.append((name, tiles[name]))
                launch.launch_with_tile(kernel, grid, tiles[name], *args, **kwargs)
                return
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", forced)
    return launched


def regular_forward(monkeypatch) -> None:
    """The test's forwards run prefix_attention_fwd, also at the shapes the decode path takes (GROUP * L at most
    configs.DECODE_MAX_ROWS, test_triton_decode.py)."""
    monkeypatch.setattr(configs, "DECODE_MAX_ROWS", 0)


# Several blocks of the largest tiles (128 rows) with ragged edges, causal with S > L, padding, GQA.
HEAD_DIM_OF_BUCKET = {64: 64, 128: 96, 256: 200}


# How a backward kernel is launched: deterministic, with the atomic prefix reduction (deterministic=False), or by
# the atomic backward (PREFIX_KERNELS_TRITON_BWD=atomic: ATOMIC_DQ on the key-side kernels, their own tiles).
BWD_MODES = ["deterministic", "atomic-prefix", "atomic"]


def set_mode(monkeypatch, mode: str) -> bool:
    """Select `mode` (BWD_MODES); returns the call's `deterministic`."""
    monkeypatch.setenv(TRITON_BWD_ENV, "atomic" if mode == "atomic" else "split")
    return mode == "deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel,bucket,tile,mode",
                         [(k, b, t, m) for k, b, t in SHIPPED for m in BWD_MODES[:2 if k == "bwd_dprefix" else 1]],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_tile_config(monkeypatch, kernel, bucket, tile, mode, dtype):
    """Each entry of configs.TILE_CONFIGS, forced on its kernel (in each way it is launched), against the float64
    oracle."""
    case = Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=HEAD_DIM_OF_BUCKET[bucket], padding=True)
    deterministic = set_mode(monkeypatch, mode)
    launched = force_tiles(monkeypatch, {kernel: tile})
    assert_matches_reference(case, dtype, "cuda", "triton", deterministic=deterministic)
    assert launched == [(kernel, tile)], launched


@pytest.mark.gpu
@pytest.mark.parametrize("features", [False, True], ids=["plain", "features"])
@pytest.mark.parametrize("kernel,bucket,tile", SHIPPED_ATOMIC_DQ,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_atomic_dq_tile_config(monkeypatch, kernel, bucket, tile, features):
    """Each entry of configs.ATOMIC_DQ_TILE_CONFIGS, forced on its kernel in the atomic backward, bf16, with the
    features off (padding) and on (packed sequences with a prefix each, a window, softcap and sinks)."""
    D = HEAD_DIM_OF_BUCKET[bucket]
    case = (packed_case((150, 37, 170), Hq=4, Hkv=2, P=130, D=D, T=2, window=100, softcap=5.0, sinks=True)
            if features else Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=D, padding=True))
    set_mode(monkeypatch, "atomic")
    launched = force_tiles(monkeypatch, {kernel: tile})
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", deterministic=False)
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


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,bucket,tile", SHIPPED_DROPOUT,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_every_shipped_dropout_tile_config(monkeypatch, kernel, bucket, tile):
    """Each entry of configs.DROPOUT_TILE_CONFIGS, forced on its kernel, with dropout (replayed by the oracle)."""
    case = Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=130, D=HEAD_DIM_OF_BUCKET[bucket], padding=True)
    launched = force_tiles(monkeypatch, {kernel: tile})
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton", dropout_p=0.2, seed=1234)
    assert launched == [(kernel, tile)], launched


# Tiles no pinned config uses, all four kernels at once, with several blocks per row at the interpreter's size.
SMALL_TILES = {"fwd": (16, 32, 4, 1), "bwd_dq": (32, 16, 4, 1), "bwd_dkdv": (32, 16, 4, 1),
               "bwd_dprefix": (16, 32, 4, 1)}


@pytest.mark.parametrize("mode", BWD_MODES)
def test_forced_tiles_run_and_match_the_reference(monkeypatch, mode):
    """The forcing mechanism of the test above, on tiles other than the pinned ones (the interpreter's is
    16 x 16): every kernel really runs with the forced tile, and the result is still the oracle's (the atomic
    backward runs no bwd_dq)."""
    case = Case(B=1, Hq=2, Hkv=1, L=20, S=37, P=33, D=16, padding=True)
    deterministic = set_mode(monkeypatch, mode)
    regular_forward(monkeypatch)
    launched = force_tiles(monkeypatch, SMALL_TILES)
    assert_matches_reference(case, torch.float32, DEVICE, "triton", deterministic=deterministic)
    expected = {k: t for k, t in SMALL_TILES.items() if not (mode == "atomic" and k == "bwd_dq")}
    assert sorted(launched) == sorted(expected.items()), launched


def test_tile_configs_are_well_formed():
    """Every kernel has tiles for every head-dim bucket; blocks are powers of two the kernels can `tl.dot`."""
    for kernel, buckets in [item for table in ALL_TABLES for item in table.items()]:
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
        shipped = {t for table in ALL_TABLES for tiles in table.get(kernel, {}).values() for t in tiles}
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
        offered = [configs._config(tile) for table in ALL_TABLES
                   for tiles in table.get(kernel, {}).values() for tile in tiles]
        for flag in configs.FEATURE_KEYS[kernel]:
            for d_pad, bucket in ((32, 64), (128, 128), (256, 256)):
                for features, table in ((False, configs.TILE_CONFIGS), (True, configs.FEATURE_TILE_CONFIGS)):
                    kept = autotuned.early_config_prune(offered, {}, D_PAD=d_pad, **{flag: features})
                    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
                    assert tiles == set(table[kernel][bucket]), (kernel, flag, d_pad, features)
            # Dropout without features: the kernel's dropout tiles where it has its own (the forward).
            dropout_table = configs.DROPOUT_TILE_CONFIGS.get(kernel, configs.TILE_CONFIGS[kernel])
            for d_pad, bucket in ((32, 64), (128, 128), (256, 256)):
                kept = autotuned.early_config_prune(offered, {}, D_PAD=d_pad, DROPOUT=True)
                assert {configs._tile(c) for c in kept} == set(dropout_table[bucket]), (kernel, d_pad)
            # The atomic backward's key-side kernels: their own tiles, with or without the features.
            if kernel in configs.ATOMIC_DQ_TILE_CONFIGS:
                for d_pad, bucket in ((32, 64), (128, 128), (256, 256)):
                    for features in (False, True):
                        kept = autotuned.early_config_prune(offered, {}, D_PAD=d_pad, DROPOUT=True, ATOMIC_DQ=True,
                                                            **{flag: features})
                        assert ({configs._tile(c) for c in kept}
                                == set(configs.ATOMIC_DQ_TILE_CONFIGS[kernel][bucket])), (kernel, d_pad, features)


def test_forward_tiles_differ_with_dropout():
    """Philox's registers: the forward's dropout tiles are their own (lighter) list, and the plain forward has
    Hopper-sized 128-row tiles with 8 warps."""
    for bucket in (64, 128, 256):
        plain = configs.TILE_CONFIGS["fwd"][bucket]
        dropout = configs.DROPOUT_TILE_CONFIGS["fwd"][bucket]
        assert plain != dropout, bucket
        assert max(bm * bn for bm, bn, _, _ in dropout) <= max(bm * bn for bm, bn, _, _ in plain), bucket
    assert any(bm == 128 and w == 8 for bm, _, w, _ in configs.TILE_CONFIGS["fwd"][64])
    assert any(bm == 128 and w == 8 for bm, _, w, _ in configs.TILE_CONFIGS["fwd"][128])


def test_sm90_only_tiles(monkeypatch):
    """Tiles that spill on sm_80 ship for sm_90 on: in the plain table, never first (the pinned tile runs
    everywhere), offered by the autotuner only on a device of capability 9.0 or more."""
    for (kernel, bucket), tiles in configs.SM90_ONLY_TILES.items():
        plain = configs.TILE_CONFIGS[kernel][bucket]
        assert tiles and tiles <= set(plain) and plain[0] not in tiles, (kernel, bucket)
        assert not tiles & set(configs.tiles_for_arch(kernel, bucket, plain, 80))
        assert configs.tiles_for_arch(kernel, bucket, plain, 90) == plain
        assert configs.tiles_for_arch(kernel, bucket, plain, None) == plain
    assert (128, 64, 8, 3) in configs.SM90_ONLY_TILES[("fwd", 128)]
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "pinned", lambda: False)
    offered = [configs._config(t) for t in configs.TILE_CONFIGS["fwd"][128]]
    for arch, want in ((80, False), (90, True), (100, True)):
        monkeypatch.setattr(configs, "device_arch", lambda arch=arch: arch)
        kept = {configs._tile(c) for c in AUTOTUNED["fwd"].early_config_prune(offered, {}, D_PAD=128)}
        assert ((128, 64, 8, 3) in kept) == want and (128, 32, 8, 3) in kept, arch


def test_autotune_key_has_prefix_length_and_group():
    for kernel, autotuned in AUTOTUNED.items():
        assert "P_BUCKET" in autotuned.keys and "GROUP" in autotuned.keys, (kernel, autotuned.keys)
        assert "L_BUCKET" in autotuned.keys and "D_PAD" in autotuned.keys and "DROPOUT" in autotuned.keys
    assert launch._buckets(1, 0, 0) == (1, 1, 1) and launch._buckets(100, 1000, 130) == (128, 1024, 256)


def _configs(*tiles):
    return [configs._config(t) for t in tiles]


def test_prune_by_size():
    """Query blocks larger than the next power of two of L are dropped (keeping the smallest block when all
    are), key blocks likewise against S (bwd_dkdv) and P (bwd_dprefix)."""
    offered = _configs((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2))
    for kernel in ("fwd", "bwd_dq"):
        everything = set(map(configs._tile, offered))
        assert {configs._tile(c) for c in configs.prune_by_size(kernel, offered, 1024)} == everything
        assert {configs._tile(c) for c in configs.prune_by_size(kernel, offered, 64)} == {
            (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)}
        assert [configs._tile(c) for c in configs.prune_by_size(kernel, offered, 1)] == [(32, 64, 4, 2)]  # decode
        assert configs.prune_by_size(kernel, offered, None) == offered
    for kernel in ("bwd_dkdv", "bwd_fused", "bwd_dprefix"):
        assert {configs._tile(c) for c in configs.prune_by_size(kernel, offered, 32)} == {(64, 32, 4, 3)}
        assert {configs._tile(c) for c in configs.prune_by_size(kernel, offered, 16)} == {(64, 32, 4, 3)}
        assert len(configs.prune_by_size(kernel, offered, 64)) == 4


def test_autotuner_prunes_by_size(monkeypatch):
    """The autotuner's prune applies the size rule on the call's buckets (a decode step keeps the smallest query
    blocks; a short prefix the smallest prefix key blocks)."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "pinned", lambda: False)
    sizes = {"fwd": "L_BUCKET", "bwd_dq": "L_BUCKET", "bwd_dkdv": "S_BUCKET", "bwd_fused": "S_BUCKET",
             "bwd_dprefix": "P_BUCKET"}
    block = {"fwd": "BLOCK_M", "bwd_dq": "BLOCK_M", "bwd_dkdv": "BLOCK_N", "bwd_fused": "BLOCK_N",
             "bwd_dprefix": "BLOCK_N"}
    for kernel, autotuned in AUTOTUNED.items():
        offered = [configs._config(tile) for table in ALL_TABLES for tiles in table.get(kernel, {}).values()
                   for tile in tiles]
        for d_pad, bucket in ((64, 64), (128, 128)):
            shipped = configs.TILE_CONFIGS[kernel][bucket]
            kept = autotuned.early_config_prune(offered, {sizes[kernel]: 1}, D_PAD=d_pad)
            smallest = min(t[0 if block[kernel] == "BLOCK_M" else 1] for t in shipped)
            assert kept and all(c.kwargs[block[kernel]] == smallest for c in kept), (kernel, bucket)
            kept = autotuned.early_config_prune(offered, {sizes[kernel]: 4096}, D_PAD=d_pad)
            assert {configs._tile(c) for c in kept} == set(shipped), (kernel, bucket)


# ---- launch: grids, TF32, the dropout seed --------------------------------------------------------------------


def test_grids_put_batch_times_heads_on_axis_0():
    """Grid axes 1 and 2 stop at 65535 programs: B * H goes on axis 0 (decode at B = 4096 with 32 heads is
    131072 programs), the blocks on axis 1."""
    plain = dict(PACKED=False)
    assert launch._grid(1, 16, 4096 * 32, plain, 1) == (4096 * 32, 1)
    assert launch._grid(300, 128, 6, plain, 1) == (6, 3)
    assert launch._grid(300, 64, 6, dict(PACKED=True), 5) == (6, 300 // 64 + 5)


def test_every_launch_has_batch_times_heads_on_axis_0(monkeypatch):
    """Every kernel launch of a forward and backward (GQA, so B * Hq and B * Hkv differ) puts its rows first."""
    grids = []
    original = launch._launch

    def recording(kernel, grid, *args, **kwargs):
        meta = {"BLOCK_M": configs.INTERPRETER_TILE[0], "BLOCK_N": configs.INTERPRETER_TILE[1]}
        grids.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, grid(meta) if callable(grid) else grid))
        original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", recording)
    case = Case(B=3, Hq=4, Hkv=2, L=40, S=37, P=5, D=16)
    assert_matches_reference(case, torch.float32, DEVICE, "triton")
    rows = {"prefix_attention_fwd": 12, "prefix_attention_bwd_preprocess": 12, "prefix_attention_bwd_dq": 12,
            "prefix_attention_bwd_dkdv": 6}
    seen = {name: grid for name, grid in grids if name in rows}
    assert set(seen) == set(rows), grids
    for name, grid in seen.items():
        assert grid[0] == rows[name] and grid[1] == -(-(40 if name != "prefix_attention_bwd_dkdv" else 37) // 16), \
            (name, grid)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "regular"])
def test_decode_with_more_than_65535_rows(monkeypatch, path):
    """Decode (L = 1) at B = 4096 with 32 query heads: 131072 query rows (the regular forward's programs; the
    decode path's are B * Hkv = 32768), more than a grid's axis 1 or 2 takes."""
    if path == "regular":
        regular_forward(monkeypatch)
    case = Case(B=4096, Hq=32, Hkv=8, L=1, S=24, P=8, D=64)
    assert_matches_reference(case, torch.bfloat16, "cuda", "triton")


class _LegacyMatmul:
    """torch.backends.cuda.matmul of a torch before 2.9: only allow_tf32."""

    def __init__(self, allow_tf32: bool):
        self.allow_tf32 = allow_tf32


class _NewMatmul:
    """torch >= 2.9: fp32_precision ("none" defers to the legacy flag), and allow_tf32 refuses mixed use."""

    def __init__(self, precision: str, legacy=False):
        self.fp32_precision = precision
        self._legacy = legacy

    @property
    def allow_tf32(self):
        if self._legacy is None:
            raise RuntimeError("mix of the legacy and new APIs")
        return self._legacy


def test_fp32_dot_precision_follows_torch(monkeypatch):
    """fp32 inputs take TF32 dots when PyTorch allows TF32 matmuls (old or new API), IEEE otherwise; half
    inputs always "tf32" (ignored); the interpreter always computes IEEE."""
    assert launch.dot_precision(torch.float16) == launch.dot_precision(torch.bfloat16) == "tf32"
    if interpreting():
        assert launch.dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    for matmul, want in [(_LegacyMatmul(True), "tf32"), (_LegacyMatmul(False), "ieee"), (_NewMatmul("tf32"), "tf32"),
                         (_NewMatmul("ieee", legacy=True), "ieee"), (_NewMatmul("none", legacy=True), "tf32"),
                         (_NewMatmul("none", legacy=False), "ieee"), (_NewMatmul("none", legacy=None), "ieee")]:
        monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
        assert launch.dot_precision(torch.float32) == want, vars(matmul)
        assert launch.dot_precision(torch.bfloat16) == "tf32"


def test_fp32_dot_precision_with_this_torch(monkeypatch):
    """The real flags of the installed torch, through both of its APIs."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
            assert launch.dot_precision(torch.float32) == "tf32"
            matmul.fp32_precision = "ieee"
            assert launch.dot_precision(torch.float32) == "ieee"
        else:
            matmul.allow_tf32 = True
            assert launch.dot_precision(torch.float32) == "tf32"
            matmul.allow_tf32 = False
            assert launch.dot_precision(torch.float32) == "ieee"
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


# ---- the interpreter at the shipped tile sizes -------------------------------------------------------------


SHIPPED_TILE_CASES = [
    # odd L and S, P not a multiple of BLOCK_N, causal with S > L (the diagonal inside the second query block)
    Case(B=1, Hq=2, Hkv=1, L=150, S=170, P=70, D=32, padding=True),
    Case(B=1, Hq=2, Hkv=1, L=150, S=170, P=70, D=32, causal=False),
    # GQA (group 3), L > S, several prefixes, D padded
    Case(B=2, Hq=3, Hkv=1, L=133, S=90, P=130, D=24, T=2),
    # the window's masked lower band, softcap and sinks, and packed sequences longer than a tile
    Case(B=1, Hq=2, Hkv=1, L=200, S=260, P=3, D=16, window=70, softcap=3.0, sinks=True),
    packed_case((150, 37, 140), Hq=2, Hkv=1, P=66, D=16, T=2, window=100),
]


@pytest.mark.skipif(not interpreting(), reason="the GPU runs the shipped tiles anyway")
@pytest.mark.parametrize("case", SHIPPED_TILE_CASES, ids=Case.id)
def test_interpreter_at_shipped_tiles(monkeypatch, case):
    """configs.shipped_tiles(): the interpreter runs each kernel at its first shipped tile (BLOCK_M 128 for the
    forward), so the production index math (the unmasked/masked split of the key loops, int64 bases) executes;
    forward and backward match the float64 oracle in fp32."""
    used = []
    original = configs.interpreter_shipped_tile

    def recording(kernel, kwargs):
        tile = original(kernel, kwargs)
        if tile is not None:
            used.append((kernel.fn.__name__, tile))
        return tile

    monkeypatch.setattr(configs, "interpreter_shipped_tile", recording)
    with configs.shipped_tiles():
        assert configs.plain_tile(configs.PREPROCESS_TILE) == configs.PREPROCESS_TILE
        assert_matches_reference(case, torch.float32, DEVICE, "triton")
    assert configs.plain_tile(configs.PREPROCESS_TILE)[0] == configs.INTERPRETER_TILE[0]
    features = bool(case.features())
    bucket = configs.head_dim_bucket(max(16, 1 << (case.D - 1).bit_length()))
    # The default backward: the opt-in fused kernel has its own shipped-tile run (test_triton_bwd_fused.py).
    want = {"prefix_attention_" + k: configs.tile_table(k, features)[bucket][0] for k in AUTOTUNED
            if k != "bwd_fused"}
    assert dict(used) == want, used
    assert want["prefix_attention_fwd"][0] == (64 if features else 128)


def test_shipped_tiles_env_var(monkeypatch):
    """PREFIX_KERNELS_INTERPRETER_TILES=shipped does the same, read at launch time."""
    assert not configs.interpreter_runs_shipped_tiles()
    monkeypatch.setenv(configs.INTERPRETER_TILES_ENV, "shipped")
    assert configs.interpreter_runs_shipped_tiles() == interpreting()


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


@pytest.mark.parametrize("path", ["decode", "regular"])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["pinned", "small-tiles"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_keys_outside_every_window_are_never_read(monkeypatch, tiles, causal, path):
    """Chunked prefill (L < S) with a window: keys before S - L - window + 1 are in no query's window. Filled
    with NaN across several key blocks (and the start of a block some queries see), they change nothing: output
    and all gradients are finite and equal the oracle's on clean values (zeros for those keys). The forward
    by either path (the decode path stacks the 40 rows of the group; the interpreter also splits the keys)."""
    if path == "regular":
        regular_forward(monkeypatch)
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


def _spread_heads(heads: int, L: int, D: int, head_stride: int) -> torch.Tensor:
    """A [1, heads, L, D] view whose heads lie head_stride elements apart, on a storage that is never touched
    (the allocator reserves it lazily: gigabytes of address space, a few pages of memory)."""
    storage = torch.empty((heads - 1) * head_stride + L * D, dtype=torch.float16, device=DEVICE)
    view = storage.as_strided((1, heads, L, D), (heads * head_stride, head_stride, D, 1))
    view.normal_()  # only the view's own elements
    return view


@pytest.mark.parametrize("tensor", ["q", "k"])
def test_head_offsets_past_int32_are_refused(monkeypatch, tensor):
    """The kernels add head offsets in int32 (launch.check_head_offsets): a tensor whose heads lie 2**30 elements
    apart (3 heads: offsets up to 2**31) is refused, by name, before any launch; 2**30 - 1 apart is not."""
    regular_forward(monkeypatch)
    names = []
    monkeypatch.setattr(launch, "_launch", lambda kernel, *a, **k: names.append(kernel))
    shapes = {"q": (3, 70, 16), "k": (3, 40, 16)}
    data = {name: torch.randn(1, *shape, dtype=torch.float16, device=DEVICE) for name, shape in shapes.items()}
    data["v"] = data["k"].clone()
    data[tensor] = _spread_heads(*shapes[tensor], head_stride=2**30)
    pk = torch.randn(3, 5, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=f"int32: {tensor} has 3 heads 1073741824 elements apart, past 2\\*\\*31"):
        prefix_attention(data["q"], data["k"], data["v"], pk, pk.clone(), backend="triton")
    assert names == []
    # Shapes and strides only (meta tensors): a bank of 2 prefixes 2**31 - 100 apart, and heads 2**30 - 1 apart.
    with pytest.raises(ValueError, match="prefix offsets in int32: prefix_k"):
        launch.check_head_offsets({}, {"prefix_k": torch.empty_strided((2, 3, 5, 16), (2**31 - 100, 80, 16, 1),
                                                                       device="meta")})
    launch.check_head_offsets({tensor: torch.empty_strided((1, 3, 70, 16), (0, 2**30 - 1, 16, 1), device="meta")},
                              {})
