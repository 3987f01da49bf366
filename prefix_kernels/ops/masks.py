"""The one definition of which keys a query sees (docs/op.md, "Semantics").

Query i (0-based among the L queries) sees every prefix key, and sequence key j iff the key is real
(`key_padding_mask`), and, with i' = i + (S - L) the query's position among the keys (bottom-right alignment,
as in flash-attn, so that a decode step with L = 1 sees the whole cache):
- when causal, j <= i';
- with a window, i' - j < window (the prefix never slides out of view: it is the model's learned sink).
Packed sequences (`cu_seqlens`) apply this rule within each sequence, whose keys are its own queries
(`sequence_spans`); the kernels apply the same rule blockwise and skip the blocks it hides. This dense form is
for the reference backend and for tests.
"""

from __future__ import annotations

import torch


def visible_keys(
    B: int,
    L: int,
    S: int,
    P: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device | str,
    window: int | None = None,
) -> torch.Tensor:
    """Bool `[B, 1, L, P + S]`: True where query i may attend to key column c (prefix first)."""
    seq = torch.ones(B, 1, L, S, dtype=torch.bool, device=device)
    i = torch.arange(L, device=device).view(L, 1) + (S - L)
    j = torch.arange(S, device=device).view(1, S)
    if causal:
        seq = seq & (j <= i)
    if window is not None:
        seq = seq & (i - j < window)
    if key_padding_mask is not None:
        seq = seq & key_padding_mask.view(B, 1, 1, S)
    prefix = torch.ones(B, 1, L, P, dtype=torch.bool, device=device)
    return torch.cat([prefix, seq], dim=-1)


def sequence_spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """The `[start, end)` positions of each packed sequence (reads the values: one device sync)."""
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))
