"""The one definition of which keys a query sees (docs/op.md, "Semantics").

Query i (0-based among the L queries) sees every prefix key, and sequence key j iff the key is real
(`key_padding_mask`) and, when causal, j <= i + (S - L): bottom-right alignment, as in flash-attn, so that a
decode step (L = 1) sees the whole cache. The kernels apply the same rule blockwise; this dense form is for
the reference backend and for tests.
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
) -> torch.Tensor:
    """Bool `[B, 1, L, P + S]`: True where query i may attend to key column c (prefix first)."""
    seq = torch.ones(B, 1, L, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(L, device=device).view(L, 1)
        j = torch.arange(S, device=device).view(1, S)
        seq = seq & (j <= i + (S - L))
    if key_padding_mask is not None:
        seq = seq & key_padding_mask.view(B, 1, 1, S)
    prefix = torch.ones(B, 1, L, P, dtype=torch.bool, device=device)
    return torch.cat([prefix, seq], dim=-1)
