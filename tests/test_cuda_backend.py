"""What only the `cuda` backend (the CUDA fallback kernels in csrc/cuda) has: the head dim is a runtime value
padded to a multiple of 16 in shared memory (wmma tiles for fp16/bf16, plain fp32 loops for fp32), and the
prefix gradients are summed from min(8, B) chunk partials in a fixed order.

GPU only (`gpu` marker). Everything every backend shares (the sweep and the multi-block shapes against the
float64 oracle, dropout, determinism, compile, opcheck, output_mask, layouts) is in test_backends.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from attention_cases import ALL_DTYPES, BASE, Case, assert_matches_reference

from prefix_kernels.ops.backends import unavailable_reason

_REASON = unavailable_reason("cuda", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 8, 15, 17, 31, 48, 100, 129, 200, 255, 256])
def test_every_head_dim_padding(D, dtype):
    """Head dims on both sides of each multiple of 16 the kernels pad to, with several blocks per row."""
    case = replace(BASE, D=D, L=33, S=40, P=17, padding=True)
    assert_matches_reference(case, dtype, "cuda", "cuda")


@pytest.mark.parametrize("B", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("T", [0, 3])
def test_prefix_gradient_chunks(B, T):
    """Fewer rows than chunks, exactly 8, and more (rows of a chunk are a slice of the work list)."""
    case = Case(B=B, Hq=4, Hkv=2, L=70, S=70, P=40, D=64, T=min(T, B) if T else 0, padding=True)
    assert_matches_reference(case, torch.float16, "cuda", "cuda")
