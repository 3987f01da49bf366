"""Tile configurations of the Triton kernels, and the autotuner that chooses among them.

`TILE_CONFIGS[kernel][D_PAD]` lists (BLOCK_M, BLOCK_N, num_warps, num_stages). Every entry shipped here
compiles for sm_80 and sm_90 without register spills and within shared memory (checked in CI by
`tools/triton_compile_check.py`). Under pytest and the Triton interpreter one config is
pinned so that tests do not spend their time tuning (the pattern of Triton's fused-attention tutorial).
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
INTERPRETER_TILE = (16, 16, 4, 1)
# The plain (not autotuned) kernels on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages). The dropout-mask
# kernel (a test helper) spills at 64 x 64 with 4 warps: Philox needs many registers per element.
PREPROCESS_TILE = (64, None, 4, 3)
DROPOUT_MASK_TILE = (32, 32, 4, 3)
AUTOTUNE_KEY = ["L_BUCKET", "S_BUCKET", "D_PAD", "CAUSAL", "DROPOUT", "DOT_PRECISION"]
PREFIX_AUTOTUNE_KEY = ["L_BUCKET", "D_PAD", "DROPOUT", "ATOMIC", "DOT_PRECISION"]


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


def configs_for(kernel: str, d_pad: int) -> list[triton.Config]:
    if interpreting():
        return [_config(INTERPRETER_TILE)]
    tiles = TILE_CONFIGS[kernel][head_dim_bucket(d_pad)]
    return [_config(tiles[0])] if pinned() else [_config(t) for t in tiles]


def all_configs(kernel: str) -> list[triton.Config]:
    """Every config of a kernel for every head-dim bucket; the autotuner keeps those of the call's D_PAD."""
    if interpreting():
        return [_config(INTERPRETER_TILE)]
    seen: dict[tuple, triton.Config] = {}
    for tiles in TILE_CONFIGS[kernel].values():
        for tile in tiles:
            seen.setdefault(tile, _config(tile))
    return list(seen.values())


def autotuned_kernel(kernel: str):
    def prune(configs, named_args, **kwargs):
        d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
        wanted = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                  for c in configs_for(kernel, d_pad)}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    key = PREFIX_AUTOTUNE_KEY if kernel == "bwd_dprefix" else AUTOTUNE_KEY
    reset = ["DPK", "DPV"] if kernel == "bwd_dprefix" else None
    return triton.autotune(configs=all_configs(kernel), key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset)
