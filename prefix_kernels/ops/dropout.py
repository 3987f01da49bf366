"""Attention dropout shared by every backend.

Each kept/dropped decision is one Philox draw (Triton's `tl.rand`, reproduced bit for bit in csrc/philox.h)
at offset `((b * Hq + h) * L + i) * (P + S) + c` for key column c (prefix columns first), kept iff the
uniform draw is >= dropout_p. The backward regenerates the mask from the same seed, so no `[B, H, L, P + S]`
mask is ever stored, and every backend drops the same probabilities for the same seed.
"""

from __future__ import annotations

import torch


def draw_seed(dropout_p: float) -> int:
    """A Philox seed from torch's generator (so `torch.manual_seed` makes dropout repeatable); 0 without dropout."""
    return int(torch.randint(0, 2**62, (1,))) if dropout_p > 0.0 else 0
