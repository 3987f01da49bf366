"""Tile configurations of the Triton kernels, and the autotuner that chooses among them.

`TILE_CONFIGS[kernel][D_PAD]` lists (BLOCK_M, BLOCK_N, num_warps, num_stages); `FEATURE_TILE_CONFIGS` those
of a launch that uses any optional feature (window, softcap, sinks, packed sequences), whose extra state makes
some plain tiles spill. Every entry shipped here compiles for sm_80 and sm_90 without register spills and
within shared memory (checked in CI by `tools/triton_compile_check.py`, the feature tiles with every feature
on). Under pytest and the Triton interpreter one config is pinned so that tests do not spend their time tuning
(the pattern of Triton's fused-attention tutorial).
"""

from __future__ import annotations

import os

import triton

from . import interpreting

# kernel -> head-dim bucket -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)]
TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(64, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "bwd_dq": {
        64: [(64, 32, 4, 3), (64, 32, 4, 2)],
        128: [(128, 32, 8, 2), (64, 32, 4, 2)],
        256: [(32, 32, 4, 2), (16, 32, 4, 2)],
    },
    # For the key-side kernels BLOCK_N is the key block a program owns, BLOCK_M the query block it loops over.
    "bwd_dkdv": {
        64: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
        128: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
    "bwd_dprefix": {
        64: [(64, 128, 8, 2), (32, 64, 4, 3)],
        128: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
}
# With the features on, plain tiles already at 255 registers on sm_80 (and bwd_dkdv's at D 128 and 256 on sm_90)
# spill: this table keeps the plain tiles that stay spill-free and adds lighter ones (more warps or smaller
# blocks) where too few remain.
FEATURE_TILE_CONFIGS: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 64, 8, 3), (64, 32, 4, 3)],
        128: [(64, 32, 4, 3), (64, 32, 8, 2), (32, 64, 4, 3)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "bwd_dq": {
        64: [(64, 32, 4, 3), (64, 32, 4, 2)],
        128: [(64, 32, 8, 2), (32, 64, 4, 2)],
        256: [(32, 32, 4, 2), (16, 32, 4, 2)],
    },
    "bwd_dkdv": {
        64: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
        128: [(16, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 2)],
    },
    "bwd_dprefix": {
        64: [(32, 64, 4, 3)],
        128: [(32, 64, 8, 2), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
}
INTERPRETER_TILE = (16, 16, 4, 1)
# The plain (not autotuned) kernels on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages). The dropout-mask
# kernel (a test helper) spills at 64 x 64 with 4 warps: Philox needs many registers per element.
PREPROCESS_TILE = (64, None, 4, 3)
DROPOUT_MASK_TILE = (32, 32, 4, 3)
AUTOTUNE_KEY = ["L_BUCKET", "S_BUCKET", "D_PAD", "CAUSAL", "DROPOUT", "DOT_PRECISION"]
PREFIX_AUTOTUNE_KEY = ["L_BUCKET", "D_PAD", "DROPOUT", "ATOMIC", "DOT_PRECISION"]
# The optional features each kernel takes as constexpr flags: they change its work per block (a window skips
# blocks, softcap adds a tanh, packed sequences are shorter than L), so each has its own tuning.
FEATURE_KEYS = {"fwd": ["WINDOW", "SOFTCAP", "SINKS", "PACKED"], "bwd_dq": ["WINDOW", "SOFTCAP", "PACKED"],
                "bwd_dkdv": ["WINDOW", "SOFTCAP", "PACKED"], "bwd_dprefix": ["SOFTCAP", "PACKED"]}


def head_dim_bucket(d_pad: int) -> int:
    return 64 if d_pad <= 64 else d_pad


def pinned() -> bool:
    """One config, no tuning: under the interpreter, and under pytest (PYTEST_VERSION is set by pytest)."""
    return interpreting() or "PYTEST_VERSION" in os.environ


def plain_tile(tile: tuple) -> tuple:
    """A plain kernel's tile, or the interpreter's small one."""
    if interpreting():
        return (INTERPRETER_TILE[0], INTERPRETER_TILE[1] if tile[1] else None, *tile[2:])
    return tile


def _config(tile: tuple[int, int, int, int]) -> triton.Config:
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def configs_for(kernel: str, d_pad: int, features: bool = False) -> list[triton.Config]:
    if interpreting():
        return [_config(INTERPRETER_TILE)]
    tiles = (FEATURE_TILE_CONFIGS if features else TILE_CONFIGS)[kernel][head_dim_bucket(d_pad)]
    return [_config(tiles[0])] if pinned() else [_config(t) for t in tiles]


def all_configs(kernel: str) -> list[triton.Config]:
    """Every config of a kernel for every head-dim bucket, plain or with features; the autotuner keeps those of
    the call's D_PAD and features."""
    if interpreting():
        return [_config(INTERPRETER_TILE)]
    seen: dict[tuple, triton.Config] = {}
    for table in (TILE_CONFIGS, FEATURE_TILE_CONFIGS):
        for tiles in table[kernel].values():
            for tile in tiles:
                seen.setdefault(tile, _config(tile))
    return list(seen.values())


def autotuned_kernel(kernel: str):
    def prune(configs, named_args, **kwargs):
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        features = any(kwargs.get(flag, named_args.get(flag, False)) for flag in FEATURE_KEYS[kernel])
        wanted = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                  for c in configs_for(kernel, d_pad, features)}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    key = (PREFIX_AUTOTUNE_KEY if kernel == "bwd_dprefix" else AUTOTUNE_KEY) + FEATURE_KEYS[kernel]
    reset = ["DPK", "DPV"] if kernel == "bwd_dprefix" else None
    return triton.autotune(configs=all_configs(kernel), key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset)
