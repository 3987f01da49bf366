"""Tile configurations of the Triton kernels, and the autotuner that chooses among them.

`TILE_CONFIGS[kernel][D_PAD]` lists (BLOCK_M, BLOCK_N, num_warps, num_stages); `DROPOUT_TILE_CONFIGS` those of a
launch with dropout for the kernels whose plain tiles are too heavy for Philox's registers (the forward);
`FEATURE_TILE_CONFIGS` those of a launch that uses any optional feature (window, softcap, sinks, packed
sequences), whose extra state makes some plain tiles spill; `ATOMIC_DQ_TILE_CONFIGS` those of the key-side kernels
in the opt-in atomic backward. Every entry shipped here compiles for sm_80 and sm_90 without register spills and
within shared memory (checked in CI by `tools/triton_compile_check.py`, the feature tiles with every feature and
dropout on). Under pytest and the Triton interpreter one config is pinned so that tests do not spend their time
tuning (the pattern of Triton's fused-attention tutorial); the interpreter runs a small tile unless
`shipped_tiles()` (or PREFIX_KERNELS_INTERPRETER_TILES=shipped) asks for the shipped ones. docs/kernels.md
describes the tables.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import triton

from . import interpreting

# kernel -> head-dim bucket -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)]
TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    # The forward without dropout: FlashAttention-2's query blocks of 128 rows over 8 warps. Larger key blocks
    # (128 x 128, and 128 x 64 at D 128 / 128 x 32 at D 256 on sm_80) spill; see SM90_ONLY_TILES.
    "fwd": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
    },
    "bwd_dq": {
        64: [(64, 32, 4, 3), (64, 32, 4, 2)],
        128: [(64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
        256: [(32, 32, 4, 2), (16, 32, 4, 2)],
    },
    # For the key-side kernels BLOCK_N is the key block a program owns, BLOCK_M the query block it loops over.
    "bwd_dkdv": {
        64: [(16, 64, 4, 2)],
        128: [(32, 64, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 2)],
    },
    # The opt-in one-launch backward (kernels_bwd_fused.py): BLOCK_N is the key block a program owns (its dK, dV),
    # BLOCK_M the query block whose dq it computes. Both parts in one program keep more state live than either
    # kernel alone, hence smaller tiles than bwd_dq / bwd_dkdv.
    "bwd_fused": {
        64: [(16, 64, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2)],
        128: [(32, 64, 8, 2)],
        256: [(16, 32, 8, 2)],
    },
    "bwd_dprefix": {
        64: [(32, 64, 4, 3), (32, 64, 8, 2)],
        128: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
}
# Plain tiles shipped only from a compute capability on (major * 10 + minor): they fit Hopper's registers
# (wgmma accumulates with fewer of them) but spill on sm_80. Never the first entry of a list (the pinned one).
SM90_ONLY_TILES: dict[tuple[str, int], set[tuple[int, int, int, int]]] = {
    ("fwd", 128): {(128, 64, 8, 3)},
    ("fwd", 256): {(128, 32, 8, 2)},
    ("bwd_dq", 128): {(128, 32, 8, 2)},
    ("bwd_fused", 64): {(32, 64, 8, 2)},
}
# The forward moves its tiles with tensor descriptors (TMA, sm_90) up to this D_PAD: at D 256 its tiles sit at 248
# to 255 registers through descriptors and some spill (the 4-warp tile under Triton 3.9, the 8-warp feature tile
# under 3.6), so a D 256 launch keeps the pointer forward.
TMA_MAX_D_PAD = 128
# The forward with dropout: Philox keeps 4 more words per score live, so the Hopper-sized plain tiles above would
# spill there; these lighter tiles do not.
DROPOUT_TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(64, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)],
        256: [(32, 32, 4, 2), (32, 32, 8, 2)],
    },
}
# With the features on, plain tiles at 255 registers on sm_80 spill: this table keeps the plain tiles that stay
# spill-free and adds lighter ones (more warps or smaller blocks) where too few remain. Every table is checked
# with the newest Triton and with 3.6.0 (torch 2.11's), whose register allocation differs.
FEATURE_TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 32, 8, 3), (32, 64, 4, 2)],
        128: [(64, 32, 8, 2), (32, 64, 4, 3)],
        256: [(32, 32, 4, 2), (32, 32, 8, 2)],
    },
    "bwd_dq": {
        64: [(64, 32, 8, 2), (32, 32, 4, 2)],
        128: [(32, 64, 4, 2), (32, 32, 8, 2)],
        256: [(32, 32, 4, 2), (16, 32, 8, 2)],
    },
    "bwd_dkdv": {
        64: [(16, 64, 4, 2), (16, 32, 4, 2)],
        128: [(16, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 2)],
    },
    "bwd_fused": {
        64: [(16, 64, 8, 2), (16, 32, 4, 2)],
        128: [(16, 64, 8, 2), (32, 32, 8, 2)],
        256: [(16, 32, 8, 1), (16, 16, 8, 2)],
    },
    "bwd_dprefix": {
        64: [(32, 64, 4, 3)],
        128: [(32, 32, 4, 2), (32, 32, 8, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
}
# The key-side kernels as the opt-in atomic backward launches them (ATOMIC_DQ: dq's fifth tile product and its fp32
# atomics on top of dK, dV), with or without the features: their plain tiles at D 128 and 256 spill there (up to
# 1000 spill stores), these do not, with dropout and with every feature on, on sm_80 and sm_90, under Triton 3.9 and
# 3.6 (16 x 32 over 4 warps at D 128 spills on sm_90 under 3.6 only).
ATOMIC_DQ_TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "bwd_dkdv": {
        64: [(32, 32, 8, 2), (32, 32, 4, 2)],
        128: [(32, 32, 8, 2), (16, 64, 8, 2)],
        256: [(16, 32, 8, 2), (16, 32, 8, 1)],
    },
    "bwd_dprefix": {
        64: [(32, 64, 8, 2)],
        128: [(32, 32, 8, 2)],
        256: [(16, 16, 8, 2)],
    },
}
INTERPRETER_TILE = (16, 16, 4, 1)
# The plain (not autotuned) kernels on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages). The dropout-mask
# kernel (a test helper) spills at 64 x 64 with 4 warps: Philox needs many registers per element.
PREPROCESS_TILE = (64, None, 4, 3)
DROPOUT_MASK_TILE = (32, 32, 4, 3)
# The decode forward (kernels_decode.py): per head-dim bucket, one tile per BLOCK_M (the most stacked rows, query
# heads of a group times queries, one program holds); a launch takes the first tile that holds its rows, or the
# last one (several tile blocks). Plain, not autotuned: the launch sizes its split of the keys in BLOCK_N blocks
# before it launches. The larger BLOCK_M need more warps or shorter key blocks not to spill with the features
# on; at D 256 a 64-row tile spills on sm_80 however it is cut, so 33 to 64 rows take two 32-row blocks.
# ptxas caps some of these at 128 or 168 registers and spills, differently per Triton version: the D 128 tiles are
# the ones that compile without spills under both Triton 3.6 and 3.9 (32 x 64 and 64 x 32 with 2 stages spill
# on 3.6), with the features off and on.
DECODE_TILES: dict[int, list[tuple[int, int, int, int]]] = {
    64: [(16, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
    128: [(16, 64, 8, 2), (32, 32, 8, 2), (64, 32, 8, 3)],
    256: [(16, 64, 8, 2), (32, 32, 4, 2)],
}
DECODE_MERGE_TILE = (32, None, 4, 1)
# The forward takes the decode path when GROUP * L is at most this (launch.py `takes_decode_path`).
DECODE_MAX_ROWS = 64
# Sizes enter the key as powers of two (launch.py `_buckets`); GROUP (query heads per KV head) changes the
# work of the key-side kernels per program and the L2 reuse of the query-side ones.
AUTOTUNE_KEY = ["L_BUCKET", "S_BUCKET", "P_BUCKET", "GROUP", "D_PAD", "CAUSAL", "DROPOUT", "DOT_PRECISION"]
PREFIX_AUTOTUNE_KEY = ["L_BUCKET", "P_BUCKET", "GROUP", "D_PAD", "DROPOUT", "ATOMIC", "DOT_PRECISION"]
# The optional features each kernel takes as constexpr flags: they change its work per block (a window skips
# blocks, softcap adds a tanh, packed sequences are shorter than L), so each has its own tuning.
FEATURE_KEYS = {"fwd": ["WINDOW", "SOFTCAP", "SINKS", "PACKED"], "bwd_dq": ["WINDOW", "SOFTCAP", "PACKED"],
                "bwd_dkdv": ["WINDOW", "SOFTCAP", "PACKED"], "bwd_fused": ["WINDOW", "SOFTCAP", "PACKED"],
                "bwd_dprefix": ["SOFTCAP", "PACKED"]}
# Further autotune keys: which parts of the fused backward run (the gradients autograd wants); whether the key-side
# kernels add dq with atomics (the atomic backward's fifth tile product).
EXTRA_KEYS = {"fwd": ["TMA"], "bwd_fused": ["DQ_ON", "DKDV_ON"], "bwd_dkdv": ["ATOMIC_DQ"],
              "bwd_dprefix": ["ATOMIC_DQ"]}
# The forward's tensor descriptors under TMA and the rows of the block each one moves: BLOCK_M queries or BLOCK_N
# keys of one (batch or prefix, head) slice, by D_PAD.
DESCRIPTOR_BLOCK_ROWS = {"Q": "BLOCK_M", "OUT": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N", "PK": "BLOCK_N",
                         "PV": "BLOCK_N"}


def set_descriptor_blocks(nargs: dict) -> None:
    """The forward's config pre-hook (a launch's arguments and its config by name): under TMA, each descriptor's
    block follows the config's tile, so one set of descriptors serves every config the autotuner tries."""
    if nargs.get("TMA"):
        for name, rows in DESCRIPTOR_BLOCK_ROWS.items():
            nargs[name].block_shape = [1, 1, nargs[rows], nargs["D_PAD"]]


def head_dim_bucket(d_pad: int) -> int:
    return 64 if d_pad <= 64 else d_pad


def pinned() -> bool:
    """One config, no tuning: under the interpreter, and under pytest (PYTEST_VERSION is set by pytest)."""
    return interpreting() or "PYTEST_VERSION" in os.environ


# ---- the interpreter at the shipped tile sizes ----------------------------------------------------------------

INTERPRETER_TILES_ENV = "PREFIX_KERNELS_INTERPRETER_TILES"
_shipped_in_interpreter = False


def interpreter_runs_shipped_tiles() -> bool:
    """Under the interpreter: whether launches use the shipped tiles (the first of each table, as pinned under
    pytest) instead of INTERPRETER_TILE. Read at every launch: `shipped_tiles()` or
    PREFIX_KERNELS_INTERPRETER_TILES=shipped."""
    return interpreting() and (_shipped_in_interpreter or os.environ.get(INTERPRETER_TILES_ENV, "") == "shipped")


@contextlib.contextmanager
def shipped_tiles() -> Iterator[None]:
    """Run the interpreter's launches inside this block at the shipped tile sizes, so that the production index
    math (BLOCK_M 128 and friends) executes on CPU tensors."""
    global _shipped_in_interpreter
    previous, _shipped_in_interpreter = _shipped_in_interpreter, True
    try:
        yield
    finally:
        _shipped_in_interpreter = previous


def tile_table(kernel: str, features: bool = False, dropout: bool = False,
               atomic_dq: bool = False) -> dict[int, list[tuple]]:
    """The table a launch chooses its tiles from: the atomic backward's first, then features, then dropout, then
    the plain tiles."""
    if atomic_dq and kernel in ATOMIC_DQ_TILE_CONFIGS:
        return ATOMIC_DQ_TILE_CONFIGS[kernel]
    if features:
        return FEATURE_TILE_CONFIGS[kernel]
    if dropout and kernel in DROPOUT_TILE_CONFIGS:
        return DROPOUT_TILE_CONFIGS[kernel]
    return TILE_CONFIGS[kernel]


def launch_tiles(kernel: str, bucket: int, features: bool = False, dropout: bool = False, atomic_dq: bool = False,
                 arch: Optional[int] = None) -> list[tuple[int, int, int, int]]:
    """The tiles a launch may take, in order: its table's (`tile_table`), less SM90_ONLY_TILES below sm_90 (plain
    table; arch None: all)."""
    tiles = tile_table(kernel, features, dropout, atomic_dq)[bucket]
    if tiles is TILE_CONFIGS[kernel][bucket]:
        tiles = tiles_for_arch(kernel, bucket, tiles, arch)
    return tiles


def _uses_features(kernel: str, args: dict) -> bool:
    return any(bool(args.get(flag, False)) for flag in FEATURE_KEYS[kernel])


def interpreter_shipped_tile(kernel, kwargs: dict) -> Optional[tuple[int, int, int, int]]:
    """The tile an autotuned `kernel` launch runs under the interpreter at shipped sizes, or None (not the
    interpreter, shipped tiles off, or a plain kernel)."""
    if not interpreter_runs_shipped_tiles():
        return None
    name = getattr(getattr(kernel, "fn", None), "__name__", "").removeprefix("prefix_attention_")
    if name not in FEATURE_KEYS:
        return None
    return launch_tiles(name, head_dim_bucket(kwargs["D_PAD"]), _uses_features(name, kwargs),
                        bool(kwargs.get("DROPOUT", False)), bool(kwargs.get("ATOMIC_DQ", False)))[0]


def plain_tile(tile: tuple) -> tuple:
    """A plain kernel's tile, or the interpreter's small one (unless it runs the shipped tiles)."""
    if interpreting() and not interpreter_runs_shipped_tiles():
        return (INTERPRETER_TILE[0], INTERPRETER_TILE[1] if tile[1] else None, *tile[2:])
    return tile


def decode_tile(d_pad: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a decode launch stacking `rows` rows (as plain_tile)."""
    tiles = DECODE_TILES[head_dim_bucket(d_pad)]
    return plain_tile(next((tile for tile in tiles if tile[0] >= rows), tiles[-1]))


def _config(tile: tuple[int, int, int, int], kernel: str = "") -> triton.Config:
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=set_descriptor_blocks if kernel == "fwd" else None)


def _tile(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def device_arch() -> Optional[int]:
    """The current CUDA device's compute capability as major * 10 + minor, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def tiles_for_arch(kernel: str, bucket: int, tiles: list[tuple], arch: Optional[int]) -> list[tuple]:
    """The tiles of a plain-table list that `arch` runs (SM90_ONLY_TILES dropped below sm_90; None: all)."""
    hopper_only = SM90_ONLY_TILES.get((kernel, bucket), set())
    return [t for t in tiles if arch is None or arch >= 90 or t not in hopper_only]


def configs_for(kernel: str, d_pad: int, features: bool = False, dropout: bool = False,
                arch: Optional[int] = None, atomic_dq: bool = False) -> list[triton.Config]:
    if interpreting():
        return [_config(INTERPRETER_TILE)]
    tiles = launch_tiles(kernel, head_dim_bucket(d_pad), features, dropout, atomic_dq, arch)
    return [_config(tiles[0])] if pinned() else [_config(t) for t in tiles]


def all_configs(kernel: str) -> list[triton.Config]:
    """Every config of a kernel for every head-dim bucket, plain, with dropout or with features; the autotuner
    keeps those of the call's D_PAD, dropout and features."""
    if interpreting():
        return [_config(INTERPRETER_TILE, kernel)]
    seen: dict[tuple, triton.Config] = {}
    for table in (TILE_CONFIGS, DROPOUT_TILE_CONFIGS, FEATURE_TILE_CONFIGS, ATOMIC_DQ_TILE_CONFIGS):
        for tiles in table.get(kernel, {}).values():
            for tile in tiles:
                seen.setdefault(tile, _config(tile, kernel))
    return list(seen.values())


# The block a kernel loops over or owns along the size its grid walks: query blocks (BLOCK_M over L) for the
# query-side kernels, key blocks (BLOCK_N) over S for bwd_dkdv and bwd_fused (whose programs own a key block and
# a query block each) and over P for bwd_dprefix.
SIZE_PRUNE = {"fwd": ("BLOCK_M", "L_BUCKET"), "bwd_dq": ("BLOCK_M", "L_BUCKET"), "bwd_dkdv": ("BLOCK_N", "S_BUCKET"),
              "bwd_fused": ("BLOCK_N", "S_BUCKET"), "bwd_dprefix": ("BLOCK_N", "P_BUCKET")}


def prune_by_size(kernel: str, configs: list[triton.Config], bucket: Optional[int]) -> list[triton.Config]:
    """Drop the configs whose grid block exceeds the (power-of-two) size it tiles, keeping at least the configs
    of the smallest such block: a 128-query block for a decode step (L = 1) is 127 wasted rows."""
    block, _ = SIZE_PRUNE[kernel]
    if not configs or bucket is None:
        return configs
    kept = [c for c in configs if c.kwargs[block] <= bucket]
    if kept:
        return kept
    smallest = min(c.kwargs[block] for c in configs)
    return [c for c in configs if c.kwargs[block] == smallest]


def autotuned_kernel(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        features = _uses_features(kernel, args)
        wanted = {_tile(c) for c in configs_for(kernel, args.get("D_PAD"), features, bool(args.get("DROPOUT")),
                                                device_arch(), bool(args.get("ATOMIC_DQ")))}
        kept = [c for c in configs if _tile(c) in wanted]
        return prune_by_size(kernel, kept, args.get(SIZE_PRUNE[kernel][1]))

    key = ((PREFIX_AUTOTUNE_KEY if kernel == "bwd_dprefix" else AUTOTUNE_KEY) + FEATURE_KEYS[kernel]
           + EXTRA_KEYS.get(kernel, []))
    reset = ["DPK", "DPV"] if kernel == "bwd_dprefix" else None
    # DQ already holds the other kernel's share of the atomic backward's dq: trial runs must not add to it.
    restore = ["DQ"] if kernel in ("bwd_dkdv", "bwd_dprefix") else None
    return triton.autotune(configs=all_configs(kernel), key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset, restore_value=restore)
