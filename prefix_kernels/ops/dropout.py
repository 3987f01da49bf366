"""Attention dropout, the same draws in every backend.

Each kept/dropped decision is one Philox4x32-10 draw (Triton's `tl.rand`; csrc/philox.h for the C++ kernels;
`dropout_keep_mask` below for the reference) at counter `((b * Hq + h) * L + i) * (P + S) + c` for key column
c (prefix columns first), kept iff the uniform draw is >= dropout_p. The backward regenerates the mask from the
same seed, so no `[B, Hq, L, P + S]` mask is ever stored, and every backend drops the same probabilities.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


# The op takes its seed as an int (a kernel argument): under torch.compile drawing it is one graph break per
# call with dropout, so that every call draws a fresh seed instead of a constant baked into the graph.
@torch.compiler.disable
def draw_seed(dropout_p: float) -> int:
    """A Philox seed from torch's generator (so `torch.manual_seed` makes dropout repeatable); 0 without dropout."""
    return int(torch.randint(0, 2**62, (1,))) if dropout_p > 0.0 else 0


def _mul32(a: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (high, low) 32-bit words of a * constant for uint32 values held in int64: split `a` in 16-bit halves so
    # that no partial product leaves the signed 64-bit range.
    a_hi, a_lo = a >> 16, a & 0xFFFF
    x, y = a_hi * constant, a_lo * constant
    high = (x + (y >> 16)) >> 16
    low = (((x & 0xFFFF) << 16) + y) & _MASK32
    return high, low


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1), bit-equal to `tl.rand(seed, offsets)` (offsets: int64, any shape)."""
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    # triton.language.random.uint_to_uniform_float: the word as int32, negatives folded by ~x.
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=offsets.device)


def dropout_keep_mask(B: int, Hq: int, L: int, P: int, S: int, dropout_p: float, seed: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool `[B, Hq, L, P + S]`, True where every backend keeps a probability for this seed."""
    rows = torch.arange(B * Hq * L, dtype=torch.int64, device=device).view(B, Hq, L, 1)
    offsets = rows * (P + S) + torch.arange(P + S, dtype=torch.int64, device=device)
    return philox_uniform(seed, offsets) >= torch.tensor(dropout_p, dtype=torch.float32, device=device)
