"""Static GPU-compile check: every shipped kernel and tile config compiles for sm_80 and sm_90 without register
spills and within shared memory. Needs no GPU (Triton compiles for a GPUTarget and runs ptxas), only ptxas."""

import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from prefix_kernels.ops.triton.configs import DROPOUT_MASK_TILE, PREPROCESS_TILE, TILE_CONFIGS

ARCHS = (80, 90)
PLAIN = [("bwd_preprocess", "bf16", "no", d_pad, str(PREPROCESS_TILE[0]), "-", *map(str, PREPROCESS_TILE[2:]))
         for d_pad in ("64", "128", "256")] + [("dropout_mask", "-", "yes", "-", *map(str, DROPOUT_MASK_TILE))]


def _ptxas() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure means: look elsewhere
        pass
    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def expected_rows() -> Counter:
    """(kernel, dtype, DROPOUT, D_PAD, BLOCK_M, BLOCK_N, warps, stages, arch) of every shipped launch."""
    rows = Counter()
    for arch in ARCHS:
        for kernel, buckets in TILE_CONFIGS.items():
            for d_pad, tiles in buckets.items():
                variants = [("bf16", "yes")]
                if kernel == "fwd":
                    variants.append(("bf16", "no"))
                for bm, bn, w, s in tiles:
                    for dtype, dropout in variants:
                        rows[(kernel, dtype, dropout, str(d_pad), str(bm), str(bn), str(w), str(s), f"sm_{arch}")] += 1
        for plain in PLAIN:
            rows[(*plain, f"sm_{arch}")] += 1
    return rows


def table_rows(text: str) -> Counter:
    rows = Counter()
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| kernel |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:9])] += 1
    return rows


@pytest.mark.slow
def test_static_compile(tmp_path):
    if _ptxas() is None:
        pytest.skip("ptxas not found (neither Triton's bundled one nor /usr/local/cuda/bin/ptxas)")
    # The kernels must be real JIT functions: conftest.py sets TRITON_INTERPRET=1 on CPU-only machines.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static_compile.md"
    proc = subprocess.run(
        [sys.executable, "-m", "prefix_kernels.ops.triton.compile_check", "--arch", *map(str, ARCHS), "--out",
         str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
    assert proc.returncode == 0, f"compile_check failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    text = out.read_text()
    assert table_rows(text) == expected_rows()
